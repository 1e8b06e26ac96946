"""The fit of a small layer (``fit.WHOLE_MAX_ENTRIES``): its whole residual formed from its factors at every step,
and each step one compiled call (``kernels.whole_step``) that takes every pair's dual lower bound (``bounds``) and
fits exactly, in ascending order of their bounds, the pairs that the bounds cannot rule out against the best
objective found (``screening.BOUND_SLACK``); with ``exhaustive``, every pair. Without the compiled kernels (or off
the CPU) every pair is fitted, by sorting its ratios (``exact.pair_medians``).

A small layer's passes cost less than the fixed costs of a step (the samples, brackets and tangent rounds of
``screening``, a dozen calls between Python and the kernels): here a step is one call, and the bounds, a few
products per entry for all pairs at once, leave most pairs unfitted. The residual is formed anew at every step (a
small product), not deflated in place, so that its entries, and the deltas selected among their ratios, are
those of the factors' product, whatever came before.
"""

from __future__ import annotations

import numpy as np
import torch

from s3lora_cli.engine import exact, kernels, screening
from s3lora_cli.engine.bounds import BOUND_POWERS
from s3lora_cli.engine.residual import Residual

Pair = tuple[int, int]


class WholeFit:
    """The steps of the fit of a small layer with candidates us: [d, Mu] and vs: [k, Mv]."""

    def __init__(self, us: torch.Tensor, vs: torch.Tensor) -> None:
        self.us, self.vs = us, vs
        self.compiled = kernels.available and us.device.type == "cpu" and us.dtype in (torch.float32, torch.float64)
        if self.compiled:
            self._u, self._v = us.T.contiguous().numpy(), vs.T.contiguous().numpy()

    def step(self, res: Residual, exhaustive: bool) -> dict[Pair, tuple[float, float]]:
        """(delta, objective) of every pair that can win this step over R = res.p @ res.q^T (of every pair, if
        ``exhaustive``): as ``exact.exact_pairs`` finds them, over every entry."""
        r = res.p @ res.q.T
        if not self.compiled:
            return self._every_pair(r)
        deltas, objectives, fitted, _ = kernels.whole_step(
            r.numpy(), self._u, self._v, BOUND_POWERS, exhaustive, screening.BOUND_SLACK, screening.TINY
        )
        return {(a, b): (float(deltas[a, b]), float(objectives[a, b])) for a, b in np.argwhere(fitted).tolist()}

    def _every_pair(self, r: torch.Tensor) -> dict[Pair, tuple[float, float]]:
        """The tensor implementation: every pair fitted, by sorting its ratios; one left candidate at a time, so
        that its tensors hold at most Mv x d x k entries."""
        d, k = r.shape
        t = torch.arange(d * k, device=r.device)
        found: dict[Pair, tuple[float, float]] = {}
        for a in range(self.us.shape[1]):
            deltas, objectives = exact.pair_medians(r.reshape(-1), self.us[:, a : a + 1], self.vs, t // k, t % k)
            found.update(
                ((a, b), (delta, objective))
                for b, (delta, objective) in enumerate(zip(deltas[0].tolist(), objectives[0].tolist(), strict=True))
            )
        return found
