"""The fit of a small layer (``fit.WHOLE_MAX_ENTRIES``): its whole residual formed once and deflated in place by
each pick, and each step one compiled call (``kernels.whole_step``) that takes every pair's dual lower bound
(``bounds``) and fits exactly, in ascending order of their bounds, the pairs that the bounds cannot rule out
against the best objective found (``screening.BOUND_SLACK``); with ``exhaustive``, every pair. Without the
compiled kernels (or off the CPU) every pair is fitted, by sorting its ratios (``exact.pair_medians``).

A small layer's passes cost less than the fixed costs of a step (the samples, brackets and tangent rounds of
``screening``, a dozen calls between Python and the kernels): here a step is one call, and the bounds, a few
products per entry for all pairs at once, leave most pairs unfitted.
"""

from __future__ import annotations

import numpy as np
import torch

from s3lora_cli.engine import exact, kernels, screening
from s3lora_cli.engine.bounds import BOUND_POWERS
from s3lora_cli.engine.residual import subtract

Pair = tuple[int, int]


class WholeResidual:
    """R = p @ q^T (p: [d, s], q: [k, s]) formed whole, with the candidates us: [d, Mu] and vs: [k, Mv] of its fit."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor) -> None:
        self.r = p @ q.T
        self.us, self.vs = us, vs
        self.compiled = kernels.available and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
        if self.compiled:
            self._u, self._v = us.T.contiguous().numpy(), vs.T.contiguous().numpy()

    def step(self, exhaustive: bool) -> dict[Pair, tuple[float, float]]:
        """(delta, objective) of every pair that can win this step (of every pair, if ``exhaustive``): as
        ``exact.exact_pairs`` finds them, over every entry."""
        if not self.compiled:
            return self._every_pair()
        deltas, objectives, fitted, _ = kernels.whole_step(
            self.r.numpy(), self._u, self._v, BOUND_POWERS, exhaustive, screening.BOUND_SLACK, screening.TINY
        )
        return {(a, b): (float(deltas[a, b]), float(objectives[a, b])) for a, b in np.argwhere(fitted).tolist()}

    def _every_pair(self) -> dict[Pair, tuple[float, float]]:
        """The tensor implementation: every pair fitted, by sorting its ratios."""
        d, k = self.r.shape
        t = torch.arange(d * k, device=self.r.device)
        deltas, objectives = exact.pair_medians(self.r.reshape(-1), self.us, self.vs, t // k, t % k)
        return {
            (a, b): (delta, objective)
            for a, (row_d, row_o) in enumerate(zip(deltas.tolist(), objectives.tolist(), strict=True))
            for b, (delta, objective) in enumerate(zip(row_d, row_o, strict=True))
        }

    def deflate(self, delta: float, u: torch.Tensor, v: torch.Tensor) -> None:
        """R <- R - delta u v^T in place, rounded as ``residual.Residual`` deflates its kept chunks."""
        subtract(self.r, delta * u, v)
