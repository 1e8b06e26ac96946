"""Running ``s3lora eval``: load the base model once, check that it carries the adapter, wrap it with PEFT, and
evaluate every variant on the same batches of prompts (greedy answers with the KV cache, and teacher-forced gold
answers against the full adapter's); returns an EvalResult and never prints."""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from s3lora_cli._version import __version__
from s3lora_cli.errors import AdapterInputError, UsageError
from s3lora_cli.evaluation.metrics import Scores, TokenSums, scores, token_sums
from s3lora_cli.evaluation.tasks import DEFAULT_REFUSAL_MARKERS, Task, TaskFile, read_tasks
from s3lora_cli.evaluation.variants import (
    Variant,
    VariantKind,
    applied,
    check_base_matches,
    load_peft_model,
    peft_directory,
    plan_variants,
    require_libraries,
)
from s3lora_cli.scoring import ScoreOptions, ScoreReport, resolve_device, score_adapter
from s3lora_cli.selection import Selection

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how.

    tasks: JSONL of {"prompt", "answer"}; refusals: JSONL of {"prompt"} whose answers are checked for
    ``refusal_markers``. selection: the layers to prune on the fly (as ``s3lora prune`` selects them; None: no
    pruned variant); pruned: a pruned adapter on disk instead; sweep_tau: one variant per tau. limit: the first N
    tasks (and refusal prompts); strict: a bad line is an error rather than skipped. max_new_tokens: the length of
    greedy answers; batch_size: prompts per forward pass; chat_template: wrap each prompt as a user turn with the
    tokenizer's chat template (when it has one). device: as for ``score``; score: how SSI is computed
    (its device is ``device``)."""

    tasks: Path
    refusals: Path | None = None
    refusal_markers: tuple[str, ...] = DEFAULT_REFUSAL_MARKERS
    selection: Selection | None = None
    pruned: Path | None = None
    sweep_tau: tuple[int, ...] = ()
    limit: int | None = None
    strict: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    chat_template: bool = True
    device: str = "auto"
    adapter_name: str | None = None
    score: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        if self.selection is not None and self.pruned is not None:
            raise UsageError("give --pruned or a selection (--tau, --threshold, --fraction), not both")
        for name, value in (
            ("--limit", self.limit),
            ("--max-new-tokens", self.max_new_tokens),
            ("--batch-size", self.batch_size),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if any(t < 0 for t in self.sweep_tau):
            raise UsageError("--sweep-tau values must be 0 or more")
        if not self.refusal_markers:
            raise UsageError("no refusal markers given")


@dataclass(frozen=True)
class VariantResult:
    """One variant's metrics, its greedy answers (in task order; None for the refusal prompts without
    --refusals) and the seconds spent on it (generation and teacher forcing)."""

    variant: Variant
    scores: Scores
    answers: tuple[str, ...]
    refusal_answers: tuple[str, ...] | None
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Everything ``evaluate`` found. ``report``: the adapter's SSI scores (None when nothing was pruned on the
    fly); ``variants``: base, adapter, pruned, then the sweep points, in that order."""

    base: str
    adapter: str
    adapter_format: str
    adapter_sha256: str
    adapter_layers: int
    tasks: TaskFile
    refusals: TaskFile | None
    options: EvalOptions
    device: str
    variants: tuple[VariantResult, ...]
    report: ScoreReport | None
    seconds: float
    tool_version: str = __version__


Progress = Callable[[int, int, str], None]


def evaluate(
    adapter: str | Path, base: str | Path, options: EvalOptions, progress: Progress | None = None
) -> EvalResult:
    """Evaluate the adapter at ``adapter`` on the base model at ``base`` (a Hugging Face directory or a .gguf
    file): base, adapter, pruned and sweep variants on the tasks of ``options``.

    Inputs are checked before any generation: the tasks files, the adapter (a PEFT adapter), and that every LoRA
    layer's module exists in the base model with the adapter's shape (AdapterInputError otherwise).
    ``progress(done, total, what)`` is called after each batch of each variant."""
    from s3lora_cli.lm import load_causal_lm

    started = time.perf_counter()
    require_libraries("transformers", "peft")
    adapter, base = Path(adapter), Path(base)
    tasks = read_tasks(options.tasks, limit=options.limit, strict=options.strict)
    refusals = (
        read_tasks(options.refusals, need_answer=False, limit=options.limit, strict=options.strict)
        if options.refusals is not None
        else None
    )
    adapter_dir, opened = peft_directory(adapter, options.adapter_name)
    with closing(opened):
        layers, adapter_format, sha256 = opened.layers, opened.format, opened.sha256()
    pruned_dir = None
    if options.pruned is not None:
        pruned_dir, pruned_adapter = peft_directory(options.pruned, None)
        with closing(pruned_adapter):
            pruned_layers = pruned_adapter.layers
    device = resolve_device(options.device)
    lm = load_causal_lm(base, device)
    check_base_matches(lm.model, layers, base, adapter)
    if pruned_dir is not None:
        check_base_matches(lm.model, pruned_layers, base, cast(Path, options.pruned))
    report = None
    if options.selection is not None or options.sweep_tau:
        score_options = ScoreOptions(
            **{**options.score.__dict__, "device": str(device), "adapter_name": options.adapter_name}
        )
        report = score_adapter(adapter, score_options)
    variants = plan_variants(report, options.selection, options.sweep_tau, options.pruned)
    model = load_peft_model(lm.model, adapter_dir, base, pruned_dir)
    runner = _Runner(model, lm.tokenizer, device, options)
    results = runner.run(variants, tasks.tasks, refusals.tasks if refusals else None, progress)
    return EvalResult(
        str(base),
        str(adapter),
        adapter_format,
        sha256,
        len(layers),
        tasks,
        refusals,
        options,
        str(device),
        results,
        report,
        time.perf_counter() - started,
    )


class _Runner:
    """Batches of prompts through every variant: greedy answers and teacher-forced answer logits."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, options: EvalOptions) -> None:
        self.model, self.tokenizer, self.device, self.options = model, tokenizer, device, options
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        # transformers 5 names the KV cache ``cache`` (argument and output); earlier versions ``past_key_values``
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"

    def context_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids: a user turn of the chat template with the assistant's turn opened, or the prompt
        as it is (with the tokenizer's special tokens) without a template."""
        tok = self.tokenizer
        if self.options.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"]

    def run(
        self,
        variants: Sequence[Variant],
        tasks: Sequence[Task],
        refusals: Sequence[Task] | None,
        progress: Progress | None,
    ) -> tuple[VariantResult, ...]:
        contexts = [self.context_ids(t.prompt) for t in tasks]
        golds = [self.answer_ids(cast(str, t.answer)) for t in tasks]  # tasks have answers (refusals do not)
        for task, ids in zip(tasks, golds, strict=True):
            if not ids:
                raise AdapterInputError(
                    f"{self.options.tasks}:{task.line}: the answer {task.answer!r} is no token "
                    "at all for this model's tokenizer"
                )
        refusal_contexts = [self.context_ids(t.prompt) for t in refusals] if refusals is not None else []
        jobs = [(batch, True) for batch in _batches(contexts, self.options.batch_size)]
        jobs += [(batch, False) for batch in _batches(refusal_contexts, self.options.batch_size)]
        unique: dict[tuple, Variant] = {}
        for v in variants:
            unique.setdefault(v.same_model_as, v)
        reference_key = next(k for k, v in unique.items() if v.kind is VariantKind.ADAPTER)
        order = [reference_key] + [k for k in unique if k != reference_key]
        answers = {k: [""] * len(tasks) for k in unique}
        refusal_answers = {k: [""] * len(refusal_contexts) for k in unique}
        sums = dict.fromkeys(unique, TokenSums())
        seconds = dict.fromkeys(unique, 0.0)
        total, done = len(jobs) * len(unique), 0
        with torch.inference_mode():
            for batch, is_task in jobs:
                ctx = [(contexts if is_task else refusal_contexts)[i] for i in batch]
                ans = [golds[i] for i in batch] if is_task else None
                reference = None
                for key in order:
                    clock = time.perf_counter()
                    with applied(self.model, unique[key]):
                        texts, forced = self.run_batch(ctx, ans)
                    if forced is not None:
                        logits, targets, mask = forced
                        reference = logits if reference is None else reference
                        sums[key] = sums[key] + token_sums(logits, reference, targets, mask)
                    for i, text in zip(batch, texts, strict=True):
                        (answers if is_task else refusal_answers)[key][i] = text
                    seconds[key] += time.perf_counter() - clock
                    done += 1
                    if progress is not None:
                        progress(done, total, unique[key].name)
        gold_texts = [cast(str, t.answer) for t in tasks]
        results = []
        for v in variants:
            key = v.same_model_as
            refused = tuple(refusal_answers[key]) if refusals is not None else None
            results.append(
                VariantResult(
                    v,
                    scores(answers[key], gold_texts, sums[key], refused, self.options.refusal_markers),
                    tuple(answers[key]),
                    refused,
                    seconds[key] if unique[key] is v else 0.0,
                )
            )
        return tuple(results)

    def run_batch(
        self, contexts: Sequence[list[int]], answers: Sequence[list[int]] | None
    ) -> tuple[list[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """One batch through the model in effect: the greedy answers, and with ``answers`` the teacher-forced
        next-token logits at the answer positions ([batch, T, vocab], T the longest answer), the answer ids
        [batch, T] and the mask [batch, T] of real answer tokens (rows left-aligned: position t predicts token t).

        The prompts are read once: their KV cache serves the teacher-forced answers (a copy of it) and greedy
        decoding. Prompts are left-padded and every position counts from its
        row's first real token, so a padded row computes what it would alone (up to rounding)."""
        width = max(len(c) for c in contexts)
        ids = torch.tensor([[self.pad] * (width - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        lengths = mask.sum(-1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        cache, first = getattr(out, self.cache), out.logits[:, -1]  # first: the logits of the first answer token
        forced = None
        if answers is not None:  # on a copy of the cache: decoding continues from the prompts alone
            forced = self._forced(answers, first, copy.deepcopy(cache), mask, lengths)
        return self._greedy(first, cache, mask, lengths), forced

    def _forced(self, answers, first, cache, mask, lengths):
        longest = max(len(a) for a in answers)
        targets = torch.tensor([a + [0] * (longest - len(a)) for a in answers], device=self.device)
        keep = torch.tensor([[True] * len(a) + [False] * (longest - len(a)) for a in answers], device=self.device)
        logits = first[:, None]
        if longest > 1:  # feed the answers' tokens but the last; right-padded, after the prompts
            step = targets[:, :-1]
            full = torch.cat([mask, keep[:, :-1].long()], dim=1)
            positions = lengths[:, None] + torch.arange(longest - 1, device=self.device)
            rest = self.model(
                input_ids=step, attention_mask=full, position_ids=positions, use_cache=True, **{self.cache: cache}
            ).logits
            logits = torch.cat([logits, rest], dim=1)
        return logits, targets, keep

    def _greedy(self, first, cache, mask, lengths) -> list[str]:
        """Greedy decoding from the prompts' cache: at most max_new_tokens, each row ending at an
        end-of-sequence token; decoded without special tokens and stripped."""
        rows, limit = first.shape[0], self.options.max_new_tokens
        eos = torch.tensor(sorted(self.eos), device=self.device, dtype=torch.long)
        stop = torch.full((rows,), limit, device=self.device)  # each row's answer length (its eos excluded)
        logits, tokens = first, []
        for step in range(limit):
            finished = stop < limit
            token = torch.where(finished, self.pad, logits.argmax(-1))  # finished rows are fed padding
            tokens.append(token)
            stop = torch.where(~finished & torch.isin(token, eos), step, stop)
            if bool((stop < limit).all()) or step + 1 == limit:
                break
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=self.device)], dim=1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=(lengths + step)[:, None],
                use_cache=True,
                **{self.cache: cache},
            )
            logits = out.logits[:, -1]
        generated = torch.stack(tokens, dim=1).tolist()
        texts = [
            self.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            for row, end in zip(generated, stop.tolist(), strict=True)
        ]
        return texts


def _batches(contexts: Sequence[list[int]], size: int) -> list[list[int]]:
    """Indices of ``contexts`` in batches of ``size``, by length (then index), so that a batch pads little."""
    order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), i))
    return [order[i : i + size] for i in range(0, len(order), size)]
