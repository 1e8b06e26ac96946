"""Which layers a report flags: the top-tau selection of paper Eq. 5 (and the rules built on it)."""

from __future__ import annotations

from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import LayerScore, ScoreReport

DEFAULT_TAU = 10
"""The paper's default: prune the 10 layers with the highest SSI."""


def top_tau(report: ScoreReport, tau: int = DEFAULT_TAU) -> tuple[LayerScore, ...]:
    """The tau highest-SSI layers (paper Eq. 5); ties broken by module name, unscored layers never."""
    if tau < 0:
        raise UsageError(f"--tau must be 0 or more, got {tau}")
    return tuple(score for score in report.layers if score.ssi is not None)[:tau]
