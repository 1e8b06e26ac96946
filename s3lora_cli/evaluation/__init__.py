"""Evaluating an adapter on a real model (``s3lora eval``): base, adapter and pruned variants side by side on the
same prompts. An optional subsystem: it needs the ``eval`` extra (transformers, peft), and nothing outside it
imports it, so ``score``, ``prune`` and ``check`` never load a model."""

from s3lora_cli.evaluation.metrics import Scores, TokenSums, contains_match, exact_match, is_refusal, token_sums
from s3lora_cli.evaluation.runner import EvalOptions, EvalResult, VariantResult, evaluate
from s3lora_cli.evaluation.tasks import DEFAULT_REFUSAL_MARKERS, Task, TaskFile, read_markers, read_tasks
from s3lora_cli.evaluation.variants import Variant, VariantKind, parse_sweep, plan_variants, require_libraries

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "EvalOptions",
    "EvalResult",
    "Scores",
    "Task",
    "TaskFile",
    "TokenSums",
    "Variant",
    "VariantKind",
    "VariantResult",
    "contains_match",
    "evaluate",
    "exact_match",
    "is_refusal",
    "parse_sweep",
    "plan_variants",
    "read_markers",
    "read_tasks",
    "require_libraries",
    "token_sums",
]
