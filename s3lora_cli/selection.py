"""Which layers a report singles out: the top-tau selection of paper Eq. 5 (and selection by SSI threshold or
fraction) with its safety limits, and each layer's SSI relative to the adapter's own (the robust z-score)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from s3lora_cli.errors import UsageError

if TYPE_CHECKING:  # only for annotations: choosing layers needs no PyTorch
    from s3lora_cli.scoring import LayerScore, ScoreReport

DEFAULT_TAU = 10
"""The paper's default: prune the 10 layers with the highest SSI."""

LARGE_SELECTION = 0.5
"""``prune`` refuses a selection of more than this fraction of the scored layers unless allow_large: pruning most
of an adapter is more likely a mistaken option than the paper's action (which prunes a few sharp layers)."""

MAD_TO_SIGMA = 1.4826
"""1 / Phi^-1(3/4): for normally distributed values, 1.4826 MAD estimates the standard deviation, so the
robust z-score reads like an ordinary z-score."""


def top_tau(report: ScoreReport, tau: int = DEFAULT_TAU) -> tuple[LayerScore, ...]:
    """The tau highest-SSI layers (paper Eq. 5); ties broken by module name, unscored layers never."""
    if tau < 0:
        raise UsageError(f"--tau must be 0 or more, got {tau}")
    return _scored(report)[:tau]


def marked_tau(report: ScoreReport, tau: int | None, allow_large: bool = False) -> int:
    """The tau ``score`` marks: ``tau`` as given (refused above the number of scored layers unless
    ``allow_large``), or, when not given, the paper's 10 capped at the number of scored layers."""
    scored = len(_scored(report))
    if tau is None:
        return min(DEFAULT_TAU, scored)
    if tau < 0:
        raise UsageError(f"--tau must be 0 or more, got {tau}")
    if tau > scored and not allow_large:
        raise UsageError(
            f"--tau {tau} is more than the {scored} scored layers of this adapter; pass a smaller "
            "--tau, or --allow-large to mark them all"
        )
    return min(tau, scored)


def above_threshold(report: ScoreReport, threshold: float) -> tuple[LayerScore, ...]:
    """Every scored layer with SSI >= threshold, in rank order (SSI descending, then module name)."""
    _check_threshold(threshold)
    return tuple(score for score in _scored(report) if score.ssi is not None and score.ssi >= threshold)


def top_fraction(report: ScoreReport, fraction: float) -> tuple[LayerScore, ...]:
    """The top ``fraction`` of the scored layers by SSI: ceil(fraction * N) of the N scored layers, so any
    fraction > 0 selects at least one layer (0.1 of 25 layers is 3, of 7 layers is 1) and 1 selects all.
    The product is rounded to 9 decimals first, so that 0.1 * 30 counts as 3, not 3.0000000000000004."""
    _check_fraction(fraction)
    scored = _scored(report)
    return scored[: math.ceil(round(fraction * len(scored), 9))]


@dataclass(frozen=True)
class Selection:
    """Which layers to prune: exactly one of ``tau`` (the top-tau by SSI, paper Eq. 5; at least 1),
    ``threshold`` (every layer with SSI >= threshold, in [0, 1]) or ``fraction`` (the top ceil(fraction * N) of
    the N scored layers, in (0, 1]). Build one with ``Selection.of``, which defaults to tau = 10.

    allow_large: allow a tau above the number of scored layers, or a selection of more than half of them
    (refused otherwise, see ``select_layers``)."""

    tau: int | None = None
    threshold: float | None = None
    fraction: float | None = None
    allow_large: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("tau", "threshold", "fraction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise UsageError(
                "give one of --tau, --threshold or --fraction"
                + (f", not {' and '.join('--' + g for g in given)}" if given else "")
            )
        if self.tau is not None and self.tau < 1:
            raise UsageError(
                f"--tau must be at least 1: --tau {self.tau} would prune nothing and write an unchanged copy"
            )
        if self.threshold is not None:
            _check_threshold(self.threshold)
        if self.fraction is not None:
            _check_fraction(self.fraction)

    @classmethod
    def of(
        cls,
        tau: int | None = None,
        threshold: float | None = None,
        fraction: float | None = None,
        allow_large: bool = False,
    ) -> Selection:
        """The selection the options ask for; the paper's tau = 10 when none is given."""
        if tau is None and threshold is None and fraction is None:
            tau = DEFAULT_TAU
        return cls(tau, threshold, fraction, allow_large)

    def describe(self) -> str:
        if self.tau is not None:
            return f"top-{self.tau} by SSI"
        if self.threshold is not None:
            return f"SSI >= {self.threshold:g}"
        return f"top {self.fraction:.4g} of layers by SSI"

    def option(self) -> str:
        """The command-line option that makes this selection, e.g. ``--tau 10``."""
        if self.tau is not None:
            return f"--tau {self.tau}"
        if self.threshold is not None:
            return f"--threshold {self.threshold:g}"
        return f"--fraction {self.fraction:g}"

    def as_dict(self) -> dict[str, int | float | None]:
        return {"tau": self.tau, "threshold": self.threshold, "fraction": self.fraction}


def select_layers(report: ScoreReport, selection: Selection) -> tuple[LayerScore, ...]:
    """The layers ``selection`` picks from ``report``, in rank order; unscored layers are never picked.

    Unless ``selection.allow_large``, a tau above the number of scored layers, or a selection of more than
    LARGE_SELECTION of them, is refused (UsageError), since it would prune most or all of the adapter."""
    scored = len(_scored(report))
    if selection.tau is not None:
        if selection.tau > scored and not selection.allow_large:
            raise UsageError(
                f"--tau {selection.tau} is more than the {scored} scored layers of this adapter: it "
                "would prune every layer; pass a smaller --tau (or --fraction), or --allow-large"
            )
        chosen = top_tau(report, selection.tau)
    elif selection.threshold is not None:
        chosen = above_threshold(report, selection.threshold)
    else:
        assert selection.fraction is not None  # a Selection has exactly one of tau, threshold and fraction
        chosen = top_fraction(report, selection.fraction)
    if len(chosen) > LARGE_SELECTION * scored and not selection.allow_large:
        raise UsageError(
            f"{selection.option()} selects {len(chosen)} of the {scored} scored layers "
            f"({percent(len(chosen), scored)}), more than half of the adapter; choose fewer "
            "(the paper prunes the few sharpest layers), or pass --allow-large"
        )
    return chosen


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a whole percentage, e.g. '7 %' (0 % of nothing)."""
    return f"{round(100 * part / whole) if whole else 0} %"


@dataclass(frozen=True)
class Spread:
    """Where each layer's SSI lies within the adapter's own distribution.

    median, mad: the median of the scored layers' SSI and their median absolute deviation from it.
    robust_z: per module, (ssi - median) / (MAD_TO_SIGMA * mad); None for an unscored layer, and for every
    layer when mad is 0 (half or more of the layers share one SSI: no scale to measure against).
    """

    median: float | None
    mad: float | None
    robust_z: dict[str, float | None]


def spread(report: ScoreReport) -> Spread:
    """The robust z-score of every layer's SSI against the adapter's median and MAD (see Spread)."""
    values = [s.ssi for s in report.layers if s.ssi is not None]
    if not values:
        return Spread(None, None, {s.module: None for s in report.layers})
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    scale = MAD_TO_SIGMA * mad
    z = {s.module: None if s.ssi is None or scale == 0 else (s.ssi - median) / scale for s in report.layers}
    return Spread(median, mad, z)


def _scored(report: ScoreReport) -> tuple[LayerScore, ...]:
    return tuple(score for score in report.layers if score.ssi is not None)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise UsageError(f"--threshold must be between 0 and 1 (SSI is a fraction), got {threshold}")


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:  # also refuses NaN
        raise UsageError(f"--fraction must be above 0 and at most 1 (0.1 = the top 10 %), got {fraction}")
