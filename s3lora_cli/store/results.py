"""The values a store scan takes and returns: its settings, one row per adapter, the nearest neighbours of an
adapter, and the ranked result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from s3lora_cli.errors import UsageError
from s3lora_cli.gate import GatePolicy
from s3lora_cli.scoring import ScoreOptions, ScoreReport

DEFAULT_TOP = 3


@dataclass(frozen=True)
class ScanSettings:
    """How a store is scanned.

    options: how each adapter is scored (the cache key includes them, except the device).
    policy: the gate applied to each adapter, or None (then no verdict and no over-threshold count).
    baseline: the policy's baseline, scored once before the scan (None without one).
    top: how many of each adapter's highest-SSI layers a row lists.
    """

    options: ScoreOptions = ScoreOptions()
    policy: GatePolicy | None = None
    baseline: ScoreReport | None = None
    top: int = DEFAULT_TOP

    def __post_init__(self) -> None:
        if self.top < 0:
            raise UsageError(f"--top must be at least 0, got {self.top}")


@dataclass(frozen=True)
class TopLayer:
    """One of an adapter's highest-SSI layers: its module path and SSI (None: not scored)."""

    module: str
    ssi: float | None


@dataclass(frozen=True)
class Neighbour:
    """Another adapter of the store and the similarity of its update to this one's (see similarity.py).

    cosine: the norm-weighted mean cosine over shared modules, in [-1, 1]. shared_modules: how many modules
    (same path, same dW shape) were compared. duplicate: cosine >= the duplicate threshold."""

    path: str
    cosine: float
    shared_modules: int
    duplicate: bool


@dataclass(frozen=True)
class ScanRow:
    """One adapter of a scanned store.

    path: relative to the store root (POSIX separators; "." for the root itself). sha256: of the weights file.
    layers / scored: LoRA layers found / scored (NaN or Inf layers are not). max_ssi: the highest SSI.
    over_threshold: layers with SSI above the policy's max-ssi (None without one). top_layers: the highest-SSI
    layers, highest first. passed: the gate's verdict (None without a policy). failing: "module: message" for
    each layer that failed the gate. cached: the scores came from the cache. error: why the adapter could not
    be scanned (the other fields are then empty). neighbours: with --similar, its nearest adapters.
    """

    path: str
    sha256: str | None = None
    layers: int = 0
    scored: int = 0
    max_ssi: float | None = None
    over_threshold: int | None = None
    top_layers: tuple[TopLayer, ...] = ()
    passed: bool | None = None
    failing: tuple[str, ...] = ()
    cached: bool = False
    error: str | None = None
    neighbours: tuple[Neighbour, ...] = ()

    @property
    def verdict(self) -> str:
        """'error', 'failed', 'passed', or 'scored' (no policy)."""
        if self.error is not None:
            return "error"
        if self.passed is None:
            return "scored"
        return "passed" if self.passed else "failed"


def risk_key(row: ScanRow) -> tuple[bool, bool, float, str]:
    """Rank rows by risk: gate failures first, then by max SSI (highest first), then by path; rows that could
    not be scanned last."""
    max_ssi = row.max_ssi if row.max_ssi is not None else -1.0
    return (row.error is not None, row.passed is not False, -max_ssi, row.path)


@dataclass(frozen=True)
class ScanResult:
    """A scanned store: its rows ranked by risk_key, and the cache directory used (None: no cache)."""

    root: Path
    rows: tuple[ScanRow, ...]
    settings: ScanSettings
    cache_dir: Path | None
