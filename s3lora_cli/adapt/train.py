"""Training LoRA adapters for one cluster: a seeded 80/20 split of its samples, a small search over PEFT LoRA
settings (causal-LM loss on the answer tokens only), each candidate validated by exact match and loss, the best
one kept."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from s3lora_cli import durable
from s3lora_cli.adapt.policy import StorePolicy
from s3lora_cli.errors import AdapterInputError, UsageError

IGNORE_INDEX = -100
"""The label of tokens the loss skips (PyTorch's cross-entropy default): the prompt and the padding."""

DEFAULT_TARGET_MODULES = StorePolicy().target_modules
"""The paper's code adapts q, k and v."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search: LoRA rank ``r``, ``lora_alpha`` (scaling = lora_alpha / r), AdamW's learning rate
    and the number of passes over the training split."""

    r: int
    lora_alpha: int
    learning_rate: float
    epochs: int

    def describe(self) -> str:
        return f"r={self.r} alpha={self.lora_alpha} lr={self.learning_rate:g} epochs={self.epochs}"


def candidates_of(policy: StorePolicy) -> tuple[Candidate, ...]:
    """The search: every combination of the policy's r, lora_alpha, learning rate and epochs."""
    return tuple(
        Candidate(r, alpha, lr, epochs)
        for r, alpha, lr, epochs in itertools.product(policy.r, policy.lora_alpha, policy.learning_rate, policy.epochs)
    )


DEFAULT_CANDIDATES = candidates_of(StorePolicy())
"""What learns on a CPU in minutes: r 8, lora_alpha 16, learning rate 3e-3, 24 epochs (measured on SmolLM2-135M;
docs/adapt.md has the tables). Made-up people, 6 distinct training samples, 12 epochs: at 1e-3 the adapter had
the answer template but not the facts (validation exact match 0), at 3e-3 both (1.0). Reversed spellings, 17
distinct samples: 12 epochs at 3e-3 gave validation 0.00, as did 6e-3 and r 16; 24 epochs gave 0.50. The paper's
rates (1e-4, 1e-5) move less still in so few steps. One candidate keeps the demo stream's clusters within its
time budget; ``policy.PAPER_SEARCH`` is the paper's grid."""


@dataclass(frozen=True)
class TrainSettings:
    """How a cluster is trained. candidates: the search; target_modules, lora_dropout: PEFT's LoRA settings;
    batch_size: samples per optimizer step; max_length: prompt and answer tokens kept (longer ones are cut from
    the left of the prompt); validation_fraction: of the distinct samples held out; seed: the split, the
    initialisation and the batch order; max_new_tokens: length of validation answers."""

    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_dropout: float = StorePolicy.lora_dropout
    batch_size: int = 8
    max_length: int = 128
    validation_fraction: float = 0.2
    seed: int = 0
    max_new_tokens: int = 32

    @classmethod
    def of(cls, policy: StorePolicy, seed: int = 0, max_new_tokens: int = 32) -> TrainSettings:
        """The training the policy asks for."""
        return cls(
            candidates=candidates_of(policy),
            target_modules=policy.target_modules,
            lora_dropout=policy.lora_dropout,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )

    def __post_init__(self) -> None:
        if not self.candidates:
            raise UsageError("the training search has no candidate")
        for c in self.candidates:
            if c.r < 1 or c.lora_alpha < 1 or c.epochs < 1 or not (0 < c.learning_rate < 1):
                raise UsageError(
                    f"training candidate {c.describe()}: r, alpha and epochs must be at least 1 and "
                    "the learning rate in (0, 1)"
                )
        if not self.target_modules:
            raise UsageError("--target-modules: give at least one module name")
        if not (0 < self.validation_fraction < 1):
            raise UsageError(f"the validation fraction must be in (0, 1), got {self.validation_fraction}")
        if self.batch_size < 1 or self.max_length < 8 or self.max_new_tokens < 1:
            raise UsageError("batch size and new tokens must be at least 1, the maximum length at least 8")


@dataclass(frozen=True)
class Example:
    """A training or validation sample: its prompt and gold answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Validation:
    """A model's scores on the validation split: exact match (share of greedy answers equal to the gold answer,
    normalised as ``s3lora eval`` does) and mean negative log-likelihood per answer token (nats)."""

    exact_match: float
    loss: float


@dataclass(frozen=True)
class CandidateResult:
    """One trained candidate: its settings, its final training loss, its validation scores and seconds."""

    candidate: Candidate
    train_loss: float
    validation: Validation
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """What ``train_cluster`` did: the split, every candidate (in search order), the best one (highest validation
    exact match, then lowest validation loss, then search order) and the directory its adapter was written to."""

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    candidates: tuple[CandidateResult, ...]
    best: CandidateResult
    adapter_dir: Path
    seconds: float
    settings: TrainSettings = field(default_factory=TrainSettings)

    def to_json(self) -> dict[str, Any]:
        return {
            "train_samples": len(self.train),
            "validation_samples": len(self.validation),
            "candidates": [
                {
                    **asdict(c.candidate),
                    "train_loss": c.train_loss,
                    "validation_exact_match": c.validation.exact_match,
                    "validation_loss": c.validation.loss,
                    "seconds": round(c.seconds, 2),
                }
                for c in self.candidates
            ],
            "best": asdict(self.best.candidate),
            "target_modules": list(self.settings.target_modules),
            "lora_dropout": self.settings.lora_dropout,
            "seed": self.settings.seed,
            "seconds": round(self.seconds, 2),
        }


Progress = Callable[[str, int, int], None]
"""progress(what, done, total): a candidate's steps, a validation's samples."""


def examples_of(records: Sequence[dict[str, Any]]) -> list[Example]:
    """The distinct (prompt, answer) pairs of task records, in first-seen order (a stream repeats samples; a
    repeat on both sides of the split would make validation a test of memory)."""
    seen: dict[tuple[str, str], None] = {}
    for i, record in enumerate(records, start=1):
        prompt, answer = record.get("prompt"), record.get("answer")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
            raise AdapterInputError(f"sample {i}: 'prompt' and 'answer' must be non-empty strings")
        seen.setdefault((prompt, answer), None)
    return [Example(p, a) for p, a in seen]


def split_examples(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) of a seeded shuffle, ceil(fraction * n) held out (at least one, and at least one left
    to train on). Held out first, from the end of the shuffle: samples whose answer another sample keeps in the
    training split (the same item asked in other words, which is what an adapter can be validated on); then, if
    more are needed, the others from the end. With no answer repeated, the last ones are held out. Fewer than two
    samples is an input problem."""
    if len(examples) < 2:
        raise AdapterInputError(
            f"a cluster needs at least 2 distinct samples to train and validate on, got {len(examples)}"
        )
    order = list(examples)
    random.Random(seed).shuffle(order)
    held = min(max(1, math.ceil(fraction * len(order))), len(order) - 1)
    in_train = Counter(e.answer for e in order)
    chosen: set[int] = set()
    for i in reversed(range(len(order))):
        if len(chosen) < held and in_train[order[i].answer] >= 2:
            in_train[order[i].answer] -= 1
            chosen.add(i)
    for i in reversed(range(len(order))):  # not enough: the others, from the end
        if len(chosen) < held:
            chosen.add(i)
    return [e for i, e in enumerate(order) if i not in chosen], [order[i] for i in sorted(chosen)]


# --- tokens ---------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of prompt + answer + end of sequence, through the chat template when there is one;
    labels are IGNORE_INDEX on the prompt. Too long: the prompt is cut from the left."""
    from s3lora_cli.adapt.trigger import format_prompt

    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt), add_special_tokens=not templated)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _batch(tokenizer: Any, examples: Sequence[Example], max_length: int, device: Any):
    """Right-padded tensors input_ids, attention_mask, labels: [batch, longest]."""
    import torch

    encoded = [_encode(tokenizer, e, max_length) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in encoded], device=device)
    return ids, mask, labels


def answer_loss(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int, batch_size: int = 8, train: bool = False
) -> tuple[Any, int]:
    """Sum of the negative log-likelihood of the answer tokens of ``examples`` (teacher forced) and their count.
    With ``train`` the sum keeps its graph (one batch only)."""
    import torch

    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = _batch(tokenizer, examples[start : start + batch_size], max_length, device)
        with torch.set_grad_enabled(train):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [batch, T-1, vocab]
            target = labels[:, 1:]
            total = total + torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        count += int((target != IGNORE_INDEX).sum())
    return total, count


def validate(
    model: Any, tokenizer: Any, examples: Sequence[Example], settings: TrainSettings, progress: Progress | None = None
) -> Validation:
    """Exact match of greedy answers and mean answer-token loss of ``model`` on ``examples``."""
    from s3lora_cli.adapt.trigger import generate_answers
    from s3lora_cli.evaluation.metrics import exact_match

    model.eval()
    hits = 0
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start : start + settings.batch_size]
        answers = generate_answers(model, tokenizer, [e.prompt for e in chunk], settings.max_new_tokens)
        hits += sum(exact_match(a.text, e.answer) for a, e in zip(answers, chunk, strict=True))
        if progress is not None:
            progress("validate", start + len(chunk), len(examples))
    total, count = answer_loss(model, tokenizer, examples, settings.max_length, settings.batch_size)
    return Validation(exact_match=hits / len(examples), loss=float(total) / max(count, 1))


def lora_config(candidate: Candidate, settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=candidate.r,
        lora_alpha=candidate.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def attached(base_model: Any, build: Callable[[Any], Any]) -> Iterator[Any]:
    """The PEFT model ``build(base_model)`` makes on ``base_model`` itself, for the block. On leaving, and when
    ``build`` fails half-way, every LoRA layer is taken out again (replaced by the layer it wraps, nothing
    merged), the attributes PEFT added are removed, and each parameter's ``requires_grad`` and the training mode
    are put back, so ``base_model`` is as it was. No copy of the base model: a copy of SmolLM2-135M is 0.5 GB,
    and the loop already holds the base model and the router's."""
    flags = [p.requires_grad for p in base_model.parameters()]
    training, attributes = base_model.training, set(vars(base_model))
    try:
        yield build(base_model)
    finally:
        _take_out_lora(base_model)
        for name in set(vars(base_model)) - attributes:  # PEFT's note on the model (peft_config)
            delattr(base_model, name)
        for p, flag in zip(base_model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        base_model.train(training)


def _take_out_lora(model: Any) -> None:
    """Replace every PEFT tuner layer inside ``model`` by the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, name, child.get_base_layer())


@contextmanager
def train_candidate(
    base_model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    candidate: Candidate,
    settings: TrainSettings,
    progress: Progress | None = None,
) -> Iterator[tuple[Any, float]]:
    """For the block: a PEFT LoRA model trained on ``train`` with AdamW (attached to ``base_model``, which is as
    it was afterwards) and its last epoch's mean answer-token loss. Seeded: the same inputs give the same
    adapter."""
    import torch
    from peft import get_peft_model

    def build(model: Any) -> Any:
        try:
            return get_peft_model(model, lora_config(candidate, settings))
        except ValueError as exc:
            raise UsageError(
                f"--target-modules {','.join(settings.target_modules)}: {str(exc).splitlines()[0]}"
            ) from None

    torch.manual_seed(settings.seed)
    with attached(base_model, build) as model:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=candidate.learning_rate)
        order = random.Random(settings.seed)
        steps = candidate.epochs * math.ceil(len(train) / settings.batch_size)
        done, last = 0, math.nan
        model.train()
        for _ in range(candidate.epochs):
            shuffled = list(train)
            order.shuffle(shuffled)
            total, count = 0.0, 0
            for start in range(0, len(shuffled), settings.batch_size):
                loss_sum, n = answer_loss(
                    model,
                    tokenizer,
                    shuffled[start : start + settings.batch_size],
                    settings.max_length,
                    settings.batch_size,
                    train=True,
                )
                (loss_sum / max(n, 1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total, count = total + float(loss_sum.detach()), count + n
                done += 1
                if progress is not None:
                    progress(f"train {candidate.describe()}", done, steps)
            last = total / max(count, 1)
        model.eval()
        yield model, last


def rank_key(result: CandidateResult) -> tuple[float, float]:
    """Best first: highest validation exact match, then lowest validation loss."""
    return (-result.validation.exact_match, result.validation.loss)


def train_cluster(
    base_model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    work: Path,
    settings: TrainSettings | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Split ``records`` (task objects with ``prompt`` and ``answer``), train every candidate of the search,
    validate each, and write the best one's PEFT adapter to a new directory inside ``work`` (made under a
    temporary name and renamed when complete, so that an interruption leaves no half-written adapter)."""
    settings = settings or TrainSettings()
    began = time.perf_counter()
    train, held = split_examples(examples_of(records), settings.validation_fraction, settings.seed)
    results: list[CandidateResult] = []
    best: CandidateResult | None = None
    adapter_dir = Path(work) / "adapter"
    for candidate in settings.candidates:
        start = time.perf_counter()
        with train_candidate(base_model, tokenizer, train, candidate, settings, progress) as (model, train_loss):
            scores = validate(model, tokenizer, held, settings, progress)
            result = CandidateResult(candidate, train_loss, scores, time.perf_counter() - start)
            if best is None or rank_key(result) < rank_key(best):
                best = result
                save_adapter(model, Path(work), adapter_dir.name)  # only the best so far is kept, on disk
        results.append(result)
    assert best is not None
    return TrainResult(
        tuple(train),
        tuple(held),
        tuple(results),
        best,
        adapter_dir,
        time.perf_counter() - began,
        settings,
    )


def save_adapter(model: Any, parent: Path, name: str) -> Path:
    """Write ``model``'s PEFT adapter to ``parent/name`` through a temporary directory renamed into place (an
    existing directory of that name is replaced)."""
    parent.mkdir(parents=True, exist_ok=True)
    destination = parent / name
    tmp = None
    try:
        with durable.deferred_signals():
            tmp = durable.make_temp_dir(parent, name)
        model.save_pretrained(str(tmp))
        with durable.deferred_signals():
            old = durable.install_dir(tmp, destination, replace=True)
            tmp = None
        durable.discard(old)
    except BaseException:
        durable.discard(tmp)
        raise
    return destination
