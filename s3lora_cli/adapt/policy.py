"""The settings of self-adaptation (the Trigger, the Trigger Buffer, the LoRA store's training, gate and routing):
their defaults, and their values from flags over a TOML policy file over pyproject.toml's ``[tool.s3lora.adapt]``
table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from s3lora_cli.errors import UsageError
from s3lora_cli.gate import _read_toml, find_pyproject

ADAPT_TABLE = "adapt"


@dataclass(frozen=True)
class TriggerPolicy:
    """How the four signals make one failure score (SAGE's combination, as its public code weighs them).

    score = weight_margin (1 - min(margin, margin_cap) / margin_cap) + weight_bleu (1 - bleu)
            + weight_rouge (1 - rouge_l) + weight_similarity (1 - max(similarity, 0)),
    multiplied by band_factor when the similarity lies inside the band [band_low, band_high] percentiles of the
    similarities of the first ``warmup`` samples (taken as in-distribution), plus weight_exact (1 - exact match),
    outside the band's factor; a sample triggers when score >= threshold. weight_exact is 0 in SAGE's combination;
    where a gold answer is to be matched exactly, it catches a wrong fact in the right frame ("X works as a
    clockmaker" for "X works as a cartographer"), which the other signals score as nearly right."""

    weight_margin: float = 0.33
    weight_bleu: float = 0.12
    weight_rouge: float = 0.23
    weight_similarity: float = 0.33
    weight_exact: float = 0.0
    margin_cap: float = 5.0
    warmup: int = 20
    band_low: float = 5.0
    band_high: float = 95.0
    band_factor: float = 0.5
    threshold: float = 0.5


@dataclass(frozen=True)
class BufferPolicy:
    """When the Trigger Buffer re-clusters, what counts as stable, and how later samples join clusters.

    min_buffer: samples before the first re-clustering; min_cluster_size and cluster_selection: HDBSCAN's
    min_cluster_size and cluster_selection_method ("leaf": the finest clusters of its hierarchy, one per atomic
    failure; "eom": excess of mass, which merges sibling clusters); stable_ari: adjusted Rand index between the
    last two labelings over the same samples; stable_centre_cosine: least cosine of centres matched by optimal
    assignment; assign_threshold: least assign_weight_cosine * cosine + (1 - it) * keyword overlap for a sample
    to join a stored cluster; merge_cosine: centres at least this close merge; min_cluster: members before a
    cluster is handed off; keywords: how many words describe a cluster."""

    min_buffer: int = 25
    min_cluster_size: int = 5
    cluster_selection: str = "leaf"
    stable_ari: float = 0.8
    stable_centre_cosine: float = 0.5
    assign_threshold: float = 0.6
    assign_weight_cosine: float = 0.7
    merge_cosine: float = 0.8
    min_cluster: int = 10
    keywords: int = 5


@dataclass(frozen=True)
class StorePolicy:
    """How the LoRA store trains, gates and serves adapters.

    The training search is every combination of ``r``, ``lora_alpha``, ``learning_rate`` and ``epochs`` (each a
    list), with ``target_modules`` and ``lora_dropout`` (PEFT's LoRA settings); the defaults are one candidate
    that learns on a CPU in minutes (``adapt.train.DEFAULT_CANDIDATES``), ``PAPER_SEARCH`` is SAGE's grid. The
    gate prunes as ``s3lora prune`` selects (at most one of ``tau``, ``prune_threshold``, ``fraction``; none:
    the paper's top-10) and quarantines an adapter whose pruned validation exact match is below ``floor``. A
    prompt goes to a cluster's adapter when its cosine with the cluster's prompt centre reaches
    ``route_threshold``; a cluster is trained again (by ``run`` as samples come, by ``refresh`` on demand) once
    ``min_new`` distinct samples have come to it since its last training."""

    r: tuple[int, ...] = (8,)
    lora_alpha: tuple[int, ...] = (16,)
    learning_rate: tuple[float, ...] = (3e-3,)
    epochs: tuple[int, ...] = (24,)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    lora_dropout: float = 0.05
    tau: int | None = None
    prune_threshold: float | None = None
    fraction: float | None = None
    floor: float = 0.5
    route_threshold: float = 0.4
    min_new: int = 5


PAPER_SEARCH = {"r": (4, 8), "lora_alpha": (8, 16), "learning_rate": (1e-4, 1e-5), "epochs": (12,)}
"""SAGE's code searches r in {4, 8}, lora_alpha in {8, 16}, learning rate in {1e-4, 1e-5}."""

SEARCHES = {"default": {k: getattr(StorePolicy, k) for k in PAPER_SEARCH}, "paper": PAPER_SEARCH}
"""``--search NAME``: a named search space; it replaces the four lists of the policy file."""

_FLAGS = {"r": "--rank", "lora_alpha": "--alpha", "learning_rate": "--lr"}
"""The command-line flags whose names are not their keys'."""

SELECTION_KEYS = ("tau", "prune_threshold", "fraction")
"""One choice of what the gate prunes: a flag giving one of them replaces the file's choice."""

# (low, high) of every setting; an int default makes the setting an integer.
_RANGES: dict[str, tuple[float, float]] = {
    "weight_margin": (0, 1),
    "weight_bleu": (0, 1),
    "weight_rouge": (0, 1),
    "weight_similarity": (0, 1),
    "weight_exact": (0, 1),
    "margin_cap": (1e-9, math.inf),
    "warmup": (0, math.inf),
    "band_low": (0, 100),
    "band_high": (0, 100),
    "band_factor": (0, 1),
    "threshold": (0, math.inf),
    "min_buffer": (2, math.inf),
    "min_cluster_size": (2, math.inf),
    "cluster_selection": (0, 0),
    "stable_ari": (-1, 1),
    "stable_centre_cosine": (-1, 1),
    "assign_threshold": (-1, math.inf),
    "assign_weight_cosine": (0, 1),
    "merge_cosine": (-1, 1),
    "min_cluster": (1, math.inf),
    "keywords": (1, math.inf),
    "r": (1, math.inf),
    "lora_alpha": (1, math.inf),
    "learning_rate": (1e-12, 1 - 1e-12),
    "epochs": (1, math.inf),
    "target_modules": (0, 0),
    "lora_dropout": (0, 1 - 1e-12),
    "tau": (1, math.inf),
    "prune_threshold": (0, 1),
    "fraction": (1e-12, 1),
    "floor": (0, 1),
    "route_threshold": (-1, 1),
    "min_new": (1, math.inf),
}
_INTEGERS = {"warmup", "min_buffer", "min_cluster_size", "min_cluster", "keywords", "r", "lora_alpha", "epochs"}
_INTEGERS |= {"tau", "min_new"}
_LISTS = {"r", "lora_alpha", "learning_rate", "epochs"}


CLUSTER_SELECTIONS = ("eom", "leaf")


def _validated(key: str, value: Any, where: str) -> Any:
    if key == "cluster_selection":
        if value not in CLUSTER_SELECTIONS:
            raise UsageError(f"{where}: expected one of {', '.join(CLUSTER_SELECTIONS)}, got {value!r}")
        return str(value)
    if key == "target_modules":
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{where}: expected module names, got {value!r}")
        modules = tuple(n.strip() for n in names if n.strip())
        if not modules:
            raise UsageError(f"{where}: give at least one module name")
        return modules
    if key in _LISTS:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise UsageError(f"{where}: give at least one value")
        return tuple(_number(key, item, where) for item in items)
    return _number(key, value, where)


def _number(key: str, value: Any, where: str) -> float | int:
    low, high = _RANGES[key]
    integer = key in _INTEGERS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UsageError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise UsageError(f"{where}: {value!r} is out of range [{low}, {high}]")
    return int(value) if integer else float(value)


def _file_settings(path: Path, from_pyproject: bool) -> dict[str, Any]:
    """The [tool.s3lora.adapt] table of ``path`` (or, for a --policy file without a tool table, its [adapt]
    table or else its top-level keys)."""
    doc = _read_toml(path)
    if "tool" in doc:
        table = doc["tool"].get("s3lora", {}).get(ADAPT_TABLE, {}) if isinstance(doc["tool"], dict) else {}
    elif from_pyproject:
        table = {}
    else:
        table = doc.get(ADAPT_TABLE, doc)
    if not isinstance(table, dict):
        raise UsageError(f"policy file {path}: [tool.s3lora.adapt] must be a table")
    settings = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in _RANGES:
            known = ", ".join(k.replace("_", "-") for k in _RANGES)
            raise UsageError(f"policy file {path}: unknown adapt key {raw_key!r}; known keys: {known}")
        settings[key] = _validated(key, value, f"{raw_key} in {path}")
    return settings


@dataclass(frozen=True)
class AdaptPolicy:
    """The three parts' settings, resolved together (one file, one precedence)."""

    trigger: TriggerPolicy = field(default_factory=TriggerPolicy)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    store: StorePolicy = field(default_factory=StorePolicy)


def resolve_adapt_policy(
    flags: Mapping[str, Any], policy_file: Path | None = None, cwd: Path | None = None, search: str | None = None
) -> AdaptPolicy:
    """The settings by precedence: ``flags`` (snake_case keys; None: not given), then ``search`` (a named search
    space, which replaces the file's r, lora-alpha, learning-rate and epochs), then ``policy_file``, otherwise the
    [tool.s3lora.adapt] table of the nearest pyproject.toml with a [tool.s3lora] table, then the defaults."""
    if policy_file is not None:
        merged = _file_settings(policy_file, from_pyproject=False)
    else:
        found = find_pyproject(cwd or Path.cwd())
        merged = _file_settings(found, from_pyproject=True) if found is not None else {}
    if search is not None:
        if search not in SEARCHES:
            raise UsageError(f"--search {search!r}: expected one of {', '.join(SEARCHES)}")
        merged.update(SEARCHES[search])
    given = {key: value for key, value in flags.items() if value is not None}
    if any(key in given for key in SELECTION_KEYS):
        for key in SELECTION_KEYS:
            merged.pop(key, None)
    for key, value in given.items():
        merged[key] = _validated(key, value, _FLAGS.get(key, f"--{key.replace('_', '-')}"))
    if merged.get("band_low", 5.0) > merged.get("band_high", 95.0):
        raise UsageError("band-low must not exceed band-high")
    chosen = [key.replace("_", "-") for key in SELECTION_KEYS if merged.get(key) is not None]
    if len(chosen) > 1:
        raise UsageError(f"the gate prunes by one of tau, prune-threshold and fraction; got {', '.join(chosen)}")

    def of(cls: Any) -> Any:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in merged.items() if k in names})

    return AdaptPolicy(of(TriggerPolicy), of(BufferPolicy), of(StorePolicy))
