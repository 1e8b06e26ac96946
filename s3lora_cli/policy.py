"""Which layers a report flags: the top-tau selection of paper Eq. 5, and selection by SSI threshold or fraction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import LayerScore, ScoreReport

DEFAULT_TAU = 10
"""The paper's default: prune the 10 layers with the highest SSI."""


def top_tau(report: ScoreReport, tau: int = DEFAULT_TAU) -> tuple[LayerScore, ...]:
    """The tau highest-SSI layers (paper Eq. 5); ties broken by module name, unscored layers never."""
    if tau < 0:
        raise UsageError(f"--tau must be 0 or more, got {tau}")
    return _scored(report)[:tau]


def above_threshold(report: ScoreReport, threshold: float) -> tuple[LayerScore, ...]:
    """Every scored layer with SSI >= threshold, in rank order (SSI descending, then module name)."""
    _check_threshold(threshold)
    return tuple(score for score in _scored(report) if score.ssi >= threshold)


def top_fraction(report: ScoreReport, fraction: float) -> tuple[LayerScore, ...]:
    """The top ``fraction`` of the scored layers by SSI: ceil(fraction * N) of the N scored layers, so any
    fraction > 0 selects at least one layer (0.1 of 25 layers is 3, of 7 layers is 1) and 1 selects all.
    The product is rounded to 9 decimals first, so that 0.1 * 30 counts as 3, not 3.0000000000000004."""
    _check_fraction(fraction)
    scored = _scored(report)
    return scored[:math.ceil(round(fraction * len(scored), 9))]


@dataclass(frozen=True)
class Selection:
    """Which layers to prune: exactly one of ``tau`` (the top-tau by SSI, paper Eq. 5), ``threshold`` (every
    layer with SSI >= threshold, in [0, 1]) or ``fraction`` (the top ceil(fraction * N) of the N scored
    layers, in (0, 1]). Build one with ``Selection.of``, which defaults to tau = 10."""

    tau: int | None = None
    threshold: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("tau", "threshold", "fraction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise UsageError(
                "give one of --tau, --threshold or --fraction" + (f", not {' and '.join('--' + g for g in given)}"
                                                                  if given else "")
            )
        if self.tau is not None and self.tau < 0:
            raise UsageError(f"--tau must be 0 or more, got {self.tau}")
        if self.threshold is not None:
            _check_threshold(self.threshold)
        if self.fraction is not None:
            _check_fraction(self.fraction)

    @classmethod
    def of(cls, tau: int | None = None, threshold: float | None = None, fraction: float | None = None) -> Selection:
        """The selection the options ask for; the paper's tau = 10 when none is given."""
        if tau is None and threshold is None and fraction is None:
            tau = DEFAULT_TAU
        return cls(tau, threshold, fraction)

    def describe(self) -> str:
        if self.tau is not None:
            return f"top-{self.tau} by SSI"
        if self.threshold is not None:
            return f"SSI >= {self.threshold:g}"
        return f"top {self.fraction:.4g} of layers by SSI"

    def as_dict(self) -> dict[str, int | float | None]:
        return {"tau": self.tau, "threshold": self.threshold, "fraction": self.fraction}


def select_layers(report: ScoreReport, selection: Selection) -> tuple[LayerScore, ...]:
    """The layers ``selection`` picks from ``report``, in rank order; unscored layers are never picked."""
    if selection.tau is not None:
        return top_tau(report, selection.tau)
    if selection.threshold is not None:
        return above_threshold(report, selection.threshold)
    return top_fraction(report, selection.fraction)


def _scored(report: ScoreReport) -> tuple[LayerScore, ...]:
    return tuple(score for score in report.layers if score.ssi is not None)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise UsageError(f"--threshold must be between 0 and 1 (SSI is a fraction), got {threshold}")


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:  # also refuses NaN
        raise UsageError(f"--fraction must be above 0 and at most 1 (0.1 = the top 10 %), got {fraction}")
