"""The Trigger: generate each sample's answer, measure its four signals against the gold answer, and decide
from SAGE's combined failure score whether the model failed it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from s3lora_cli.adapt.embedding import Embedder
from s3lora_cli.adapt.policy import TriggerPolicy
from s3lora_cli.adapt.signals import Signals, cosine, logit_margins, rouge_l, sentence_bleu
from s3lora_cli.adapt.tasks import Task


@dataclass(frozen=True)
class Generation:
    """A generated answer: its text (up to the first end-of-sequence token) and its logit margin."""

    text: str
    margin: float


@dataclass(frozen=True)
class Band:
    """The similarity band of the warm-up samples: [low, high], from ``count`` samples."""

    low: float
    high: float
    count: int


@dataclass(frozen=True)
class TriggerRecord:
    """One sample's verdict. warmup: among the first ``policy.warmup`` samples (which fix the band)."""

    task: Task
    generated: str
    signals: Signals
    score: float
    in_band: bool
    triggered: bool
    warmup: bool

    def to_json(self) -> dict[str, Any]:
        s = self.signals
        return {
            "line": self.task.line,
            "task": self.task.record,
            "generated": self.generated,
            "signals": {
                "margin": s.margin,
                "bleu": s.bleu,
                "rouge_l": s.rouge_l,
                "similarity": s.similarity,
                "exact_match": s.exact_match,
            },
            "score": self.score,
            "in_band": self.in_band,
            "triggered": self.triggered,
            "warmup": self.warmup,
        }


@dataclass
class TriggerSummary:
    """Counts of samples and triggered samples, overall and per tag (samples without a tag under None)."""

    total: int = 0
    triggered: int = 0
    per_tag: dict[str | None, list[int]] = field(default_factory=dict)
    band: Band | None = None

    def add(self, record: TriggerRecord) -> None:
        self.total += 1
        self.triggered += record.triggered
        counts = self.per_tag.setdefault(record.task.tag, [0, 0])
        counts[0] += 1
        counts[1] += record.triggered


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
    """Greedy answers to ``prompts`` (one left-padded batch), each with the mean top-1 minus top-2 logit over
    its tokens up to and including its first end-of-sequence token."""
    import torch

    texts = [format_prompt(tokenizer, p) for p in prompts]
    templated = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not templated)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out.sequences[:, enc["input_ids"].shape[1] :]  # [batch, steps]
    logits = torch.stack(out.logits)  # [steps, batch, vocab]
    is_eos = torch.isin(new, torch.tensor(_eos_ids(model, tokenizer), device=new.device))
    before_first_eos = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) == 0  # [batch, steps]
    margins = logit_margins(logits, before_first_eos)
    answers = []
    for row, keep, eos, margin in zip(new, before_first_eos, is_eos, margins, strict=True):
        text = tokenizer.decode(row[keep & ~eos], skip_special_tokens=True).strip()
        answers.append(Generation(text=text, margin=margin))
    return answers


def failure_score(signals: Signals, policy: TriggerPolicy, band: Band | None) -> tuple[float, bool]:
    """SAGE's combined failure score of one sample (TriggerPolicy gives the formula) and whether its similarity
    lay inside the warm-up band (which halves the score)."""
    p = policy
    margin = min(max(signals.margin, 0.0), p.margin_cap) / p.margin_cap
    score = (
        p.weight_margin * (1.0 - margin)
        + p.weight_bleu * (1.0 - signals.bleu)
        + p.weight_rouge * (1.0 - signals.rouge_l)
        + p.weight_similarity * (1.0 - max(signals.similarity, 0.0))
    )
    in_band = band is not None and band.low <= signals.similarity <= band.high
    exact = p.weight_exact * (1.0 - signals.exact_match)  # outside the band's factor: a wrong answer is wrong
    return (score * p.band_factor if in_band else score) + exact, in_band


def similarity_band(similarities: Sequence[float], policy: TriggerPolicy) -> Band | None:
    """The [band_low, band_high] percentiles (linear interpolation) of the warm-up similarities; None without
    any."""
    if not similarities:
        return None
    low, high = np.percentile(np.asarray(similarities, dtype=np.float64), [policy.band_low, policy.band_high])
    return Band(low=float(low), high=float(high), count=len(similarities))


def measure_signals(tasks: Sequence[Task], generations: Sequence[Generation], embed: Embedder) -> list[Signals]:
    """The signals of each generated answer against its task's gold answer."""
    from s3lora_cli.evaluation.metrics import exact_match

    vectors = embed([g.text for g in generations] + [t.answer for t in tasks])
    n = len(tasks)
    return [
        Signals(
            margin=g.margin,
            bleu=sentence_bleu(g.text, t.answer),
            rouge_l=rouge_l(g.text, t.answer),
            similarity=cosine(vectors[i], vectors[n + i]),
            exact_match=float(exact_match(g.text, t.answer)),
        )
        for i, (t, g) in enumerate(zip(tasks, generations, strict=True))
    ]


def run_trigger(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[Task],
    policy: TriggerPolicy,
    embed: Embedder,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    summary: TriggerSummary | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[TriggerRecord]:
    """Yield a TriggerRecord for every task, in stream order, generating ``batch_size`` answers at a time.

    The first ``policy.warmup`` samples fix the similarity band; they are held (and yielded, scored with the
    band) once it is fixed. ``summary`` (if given) is updated as records are yielded; ``progress`` is called with
    the number of samples generated so far."""
    summary = summary if summary is not None else TriggerSummary()
    held: list[tuple[Task, str, Signals]] = []
    warm: list[float] = []
    band: Band | None = None
    fixed = policy.warmup == 0
    done = 0
    stream = iter(tasks)

    def emit(task: Task, text: str, signals: Signals, warmup: bool) -> TriggerRecord:
        score, in_band = failure_score(signals, policy, band)
        record = TriggerRecord(
            task=task,
            generated=text,
            signals=signals,
            score=score,
            in_band=in_band,
            triggered=score >= policy.threshold,
            warmup=warmup,
        )
        summary.add(record)
        return record

    while batch := list(islice(stream, batch_size)):
        generations = generate_answers(model, tokenizer, [t.prompt for t in batch], max_new_tokens)
        measured = measure_signals(batch, generations, embed)
        done += len(batch)
        if progress is not None:
            progress(done)
        for task, generation, signals in zip(batch, generations, measured, strict=True):
            if fixed:
                yield emit(task, generation.text, signals, warmup=False)
                continue
            if len(warm) < policy.warmup:
                warm.append(signals.similarity)
            held.append((task, generation.text, signals))
        if not fixed and len(warm) >= policy.warmup:
            band, fixed = similarity_band(warm, policy), True
            summary.band = band
            for i, (task, text, signals) in enumerate(held):
                yield emit(task, text, signals, warmup=i < policy.warmup)
            held = []
    if held:  # a stream shorter than the warm-up: the band of what there was
        band = similarity_band(warm, policy)
        summary.band = band
        for task, text, signals in held:
            yield emit(task, text, signals, warmup=True)
