"""The settings of the Trigger and the Trigger Buffer: their defaults, and their values from flags over a TOML
policy file over pyproject.toml's ``[tool.s3lora.adapt]`` table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
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
    similarities of the first ``warmup`` samples (taken as in-distribution); a sample triggers when
    score >= threshold."""

    weight_margin: float = 0.33
    weight_bleu: float = 0.12
    weight_rouge: float = 0.23
    weight_similarity: float = 0.33
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


# (low, high) of every setting; an int default makes the setting an integer.
_RANGES: dict[str, tuple[float, float]] = {
    "weight_margin": (0, 1),
    "weight_bleu": (0, 1),
    "weight_rouge": (0, 1),
    "weight_similarity": (0, 1),
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
}
_DEFAULTS = {f.name: f.default for cls in (TriggerPolicy, BufferPolicy) for f in fields(cls)}


CLUSTER_SELECTIONS = ("eom", "leaf")


def _validated(key: str, value: Any, where: str) -> float | int | str:
    if key == "cluster_selection":
        if value not in CLUSTER_SELECTIONS:
            raise UsageError(f"{where}: expected one of {', '.join(CLUSTER_SELECTIONS)}, got {value!r}")
        return str(value)
    low, high = _RANGES[key]
    integer = isinstance(_DEFAULTS[key], int)
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


def resolve_adapt_policy(
    flags: Mapping[str, Any], policy_file: Path | None = None, cwd: Path | None = None
) -> tuple[TriggerPolicy, BufferPolicy]:
    """The settings by precedence: ``flags`` (snake_case keys; None: not given), then ``policy_file``, otherwise
    the [tool.s3lora.adapt] table of the nearest pyproject.toml with a [tool.s3lora] table, then the defaults."""
    if policy_file is not None:
        merged = _file_settings(policy_file, from_pyproject=False)
    else:
        found = find_pyproject(cwd or Path.cwd())
        merged = _file_settings(found, from_pyproject=True) if found is not None else {}
    for key, value in flags.items():
        if value is not None:
            merged[key] = _validated(key, value, f"--{key.replace('_', '-')}")
    if merged.get("band_low", 5.0) > merged.get("band_high", 95.0):
        raise UsageError("band-low must not exceed band-high")
    trigger_keys = {f.name for f in fields(TriggerPolicy)}
    return (
        TriggerPolicy(**{k: v for k, v in merged.items() if k in trigger_keys}),
        BufferPolicy(**{k: v for k, v in merged.items() if k not in trigger_keys}),
    )
