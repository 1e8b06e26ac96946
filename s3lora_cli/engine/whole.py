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
from s3lora_cli.engine.bounds import BOUND_POWERS, power
from s3lora_cli.engine.residual import subtract
from s3lora_cli.engine.state import FitState

Pair = tuple[int, int]


class WholeResidual:
    """R = p @ q^T (p: [d, s], q: [k, s]) formed whole, with the candidates us: [d, Mu] and vs: [k, Mv] of its fit."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, state: FitState) -> None:
        self.r = p @ q.T
        self.us, self.vs = us, vs
        self.compiled = kernels.available and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
        if self.compiled:
            self._u, self._v = us.T.contiguous().numpy(), vs.T.contiguous().numpy()
            self._terms = bound_terms(vs, state)

    def step(self, exhaustive: bool) -> dict[Pair, tuple[float, float]]:
        """(delta, objective) of every pair that can win this step (of every pair, if ``exhaustive``): as
        ``exact.exact_pairs`` finds them, over every entry."""
        if not self.compiled:
            return self._every_pair()
        deltas, objectives, fitted, _ = kernels.whole_step(
            self.r.numpy(), self._u, self._v, self._terms, exhaustive, screening.BOUND_SLACK, screening.TINY
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


def bound_terms(vs: torch.Tensor, state: FitState) -> tuple:
    """What ``kernels.whole_step`` takes from the candidates alone for the dual bounds of every power alpha in
    BOUND_POWERS (``bounds.BoundTerms``): left [P, 3, Mu, d] and right [P, 3, Mv, k], kind 0 the factors of the
    projection of sign(R) (u |u|^alpha, v |v|^alpha), kind 1 those of |R| (|u|^alpha, |v|^alpha), kind 2 those of
    E (sign(u) |u|^alpha, sign(v) |v|^alpha); norm and c3 [P, Mu, Mv]; all float64."""
    vs64 = vs.to(torch.float64)
    left, right, norm, c3 = [], [], [], []
    for alpha in BOUND_POWERS:
        terms, v_pow = state.bound_terms(alpha), power(vs64, alpha)
        left.append(torch.stack([terms.u_signed, terms.u_pow.T, terms.u_dir]))
        right.append(torch.stack([(vs64 * v_pow).T, v_pow.T, terms.v_dir.T]))
        norm.append(terms.norm)
        c3.append(terms.c3)
    return tuple(torch.stack(part).contiguous().numpy() for part in (left, right, norm, c3))
