"""Tangent bounds: a pair's objective f(delta) = sum_ij |R_ij - delta u_i v_j| is convex and piecewise linear in
delta, so its value and a subgradient at a few points (a pass that forms no ratio) bound its minimum from below
(the upper envelope of the tangents) and from above (the smallest value).

Derivation. For any signs s_ij, f(y) >= sum s_ij (R_ij - y u_i v_j); with s = sign(e), e = R - theta u v^T, that
is the tangent at theta, of value f(theta) and slope g(theta) = -sum u_i v_j sign(e_ij). The minimum of f is at
least the minimum over y of the largest tangent, which lies where a falling and a rising tangent cross. Computed
in the compute dtype, each tangent carries ``err`` (``rounding.Rounding.of_sum``): a bound on the error of its
value and of its slope times any distance the envelope spans; the envelope's lower bound is widened by
ENVELOPE_ERRORS of them and its upper bound by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from s3lora_cli.engine import kernels
from s3lora_cli.engine.residual import Residual, read_pass, use_kernel
from s3lora_cli.engine.rounding import Rounding

if TYPE_CHECKING:
    from s3lora_cli.engine.bounds import DualSumTotals

SPAN_ERRORS = 7
"""A tangent's err, in units of the rounding of theta_max W (W = sum |u_i v_j|, theta_max the largest |theta|
probed): 1 for its value (sum |e| <= ||R||_1 + |theta| W), 4 for its slope (2 sum_{e > 0} v_j - sum_j v_j
doubles the sum's rounding, over a distance up to 2 theta_max) and 2 for the entries whose e is within rounding
of 0 (either sign gives a subgradient there)."""

ENVELOPE_ERRORS = 3
"""The lower bound of an envelope is off by at most three tangents' err: the two that cross, and the largest
tangent at the crossing."""

L1_MARGIN = 1e-3
"""||R||_1 <= f(theta) + |theta| W holds exactly; a computed f is within (SUM_BLOCK + SUM_SLACK) eps of it
(below 1e-5 relative in float32), so the bound taken from it is widened by this relative margin, far above that."""

TANGENT_SHRINK = 8.0
"""Each round of tangents narrows a pair's bracket by this factor around the minimum (``narrowed``)."""


class Envelope(NamedTuple):
    """What a pair's tangents say about min f: lower and upper bounds, and the tightest [theta_a, theta_b] known
    to hold a minimiser (None if none is known)."""

    lower: float
    upper: float
    bracket: tuple[float, float] | None


@dataclass(frozen=True)
class Tangent:
    """f(theta) and a subgradient g(theta) of a pair's objective f(delta) = sum |R - delta u v^T|, with err,
    a bound on the rounding in f (and in g times any distance the envelope spans)."""

    theta: float
    f: float
    g: float
    err: float


def tangents(
    res: Residual, us, vs, pairs: list[tuple[int, int]], points: dict[tuple[int, int], tuple[float, ...]]
) -> dict[tuple[int, int], list[Tangent]]:
    """f and a subgradient at each of a pair's points (one or two: the ends of a bracket, or one end), from
    one pass that forms no ratio (see ``TangentPass``)."""
    probes = TangentPass(us, vs, pairs, points)
    read_pass(res, [probes])
    return probes.finish()


class TangentPass:
    """The tangents of some pairs' objectives at given points, summed a chunk of R at a time: by ``tangents``
    in a pass of their own, or in the pass of the dual sums and the first exact pair (a consumer of
    ``residual.read_pass``).

    f(theta) = sum |e| with e = R - theta u v^T is convex and piecewise linear, and for any signs s_ij,
    f(y) >= sum s_ij (R_ij - y u_i v_j): with s = sign(e) that is the tangent at theta, of value f(theta)
    and slope g(theta) = -sum u_i v_j sign(e_ij).
    """

    def __init__(self, us, vs, pairs: list[tuple[int, int]], points: dict[tuple[int, int], tuple[float, ...]]) -> None:
        f64 = torch.float64
        self.pairs = pairs
        ia = torch.tensor([a for a, _ in pairs], device=us.device)
        ib = torch.tensor([b for _, b in pairs], device=us.device)
        self.u, self.v = us.T[ia].contiguous(), vs.T[ib].contiguous()  # [P, d], [P, k]
        # probes (pair's index, theta); the kernel takes them two at a time: a pair's two points together
        self.probes = [(k, theta) for k, pair in enumerate(pairs) for theta in points[pair]]
        self.doubles = [(2 * k, 2 * k + 1) for k in range(len(self.probes) // 2)]
        if len(self.probes) % 2:
            self.doubles.append((len(self.probes) - 1, len(self.probes) - 1))
        self.slots = torch.tensor([[self.probes[m][0], self.probes[n][0]] for m, n in self.doubles], dtype=torch.int64)
        # the points are taken in the compute dtype, where the pass multiplies by them
        self.thetas = torch.tensor([[self.probes[m][1], self.probes[n][1]] for m, n in self.doubles], dtype=f64).to(
            us.dtype
        )
        self.sums = torch.zeros(len(self.doubles), 4, dtype=f64, device=us.device)
        self._kernel_args: tuple | None = None  # (u, v, slots, thetas, sum_j v) as the kernel takes them

    absorbs_deflation = False

    def add(self, rows: slice, r_chunk: torch.Tensor, owed: tuple | None = None) -> None:
        u, v, slots, thetas, sums, f64 = self.u, self.v, self.slots, self.thetas, self.sums, torch.float64
        if use_kernel(r_chunk):
            if self._kernel_args is None:
                self._kernel_args = (
                    u.numpy(),
                    v.numpy(),
                    slots.numpy(),
                    thetas.numpy(),
                    v.numpy().sum(axis=1, dtype=np.float64),
                )
            u_np, v_np, slots_np, thetas_np, vsum = self._kernel_args
            sums.numpy()[:] += kernels.tangent_sums(r_chunk.numpy(), u_np, v_np, slots_np, thetas_np, rows.start, vsum)
            return
        for s, (k_p, k_q) in enumerate(slots.tolist()):
            for m, (k, theta) in enumerate(((k_p, thetas[s, 0]), (k_q, thetas[s, 1]))):
                u_k = u[k, rows]
                e = r_chunk - (theta * u_k)[:, None] * v[k][None, :]
                sums[s, 2 * m] += e.abs().sum(dtype=f64)
                sums[s, 2 * m + 1] -= (u_k.to(f64) * (e.sign() * v[k][None, :]).sum(1, dtype=f64)).sum()

    def finish(self) -> dict[tuple[int, int], list[Tangent]]:
        """Every pair's tangents, once all chunks are in."""
        f64, u, v = torch.float64, self.u, self.v
        sums, thetas = self.sums.cpu().reshape(-1, 2), self.thetas.to(f64).reshape(-1)  # (f, g), theta per probe
        found: dict[int, tuple[float, float, float]] = {}  # probe -> (theta, f, g)
        for n, m in enumerate(m for double in self.doubles for m in double):
            found.setdefault(m, (float(thetas[n]), float(sums[n, 0]), float(sums[n, 1])))
        # err: the module docstring and SPAN_ERRORS; each sum is added in runs of SUM_BLOCK (the kernel's)
        rounding = Rounding(torch.finfo(u.dtype).eps)
        w_all = (u.to(f64).abs().sum(1) * v.to(f64).abs().sum(1)).cpu().tolist()
        result: dict[tuple[int, int], list[Tangent]] = {pair: [] for pair in self.pairs}
        for k, pair in enumerate(self.pairs):
            mine = [found[m] for m, probe in enumerate(self.probes) if probe[0] == k]
            theta_max = max(abs(theta) for theta, _, _ in mine)
            r_abs = min(f + abs(theta) * w_all[k] for theta, f, _ in mine) * (1 + L1_MARGIN)
            err = rounding.of_sum(kernels.SUM_BLOCK, r_abs + SPAN_ERRORS * theta_max * w_all[k])
            result[pair] = [Tangent(theta, f, g, err) for theta, f, g in mine]
        return result


def envelope_bounds(tangents: list[Tangent]) -> Envelope:
    """(lower, upper, bracket) for min f from tangents of f: lower is the minimum of their upper envelope
    (a convex function below f), -inf if every slope has the same sign; upper the smallest f(theta);
    bracket the tightest [theta_a, theta_b] known to hold a minimiser, or None if none is known. Both
    bounds are widened by the rounding the tangents allow (a slope's error over the envelope's span is
    at most err, as |theta| <= the largest end)."""
    err = max(t.err for t in tangents)
    upper = min(t.f for t in tangents) + err
    falling = [t for t in tangents if t.g <= 0]
    rising = [t for t in tangents if t.g >= 0]
    if not falling or not rising:
        return Envelope(-math.inf, upper, None)
    left = max(falling, key=lambda t: t.theta)
    right = min(rising, key=lambda t: t.theta)
    if left.theta > right.theta:  # inconsistent by rounding: a slope's sign flipped at a tie
        return Envelope(-math.inf, upper, None)
    lower = math.inf
    for a in falling:
        for b in rising:
            if b.g > a.g:
                x = (b.f - a.f + a.g * a.theta - b.g * b.theta) / (a.g - b.g)
            else:  # both slopes zero: f is flat there
                x = a.theta
            lower = min(lower, max(t.f + t.g * (x - t.theta) for t in tangents))
    if math.isnan(lower):  # an infinite tangent: it bounds nothing
        lower = -math.inf
    return Envelope(lower - ENVELOPE_ERRORS * err, upper, (left.theta, right.theta))


def far_end(bracket: tuple[float, float]) -> tuple[float, ...]:
    """Where an early pair's first tangent is taken: the end of its sampled bracket away from 0. With the tangent
    at 0 (from the dual sums of the same pass) it brackets the minimum from both sides, as the two ends would
    (where the bracket holds it), for one probe instead of two: at steps that are not near ties that rules out
    as many pairs (measured). Both ends when the bracket holds 0."""
    lo, hi = bracket
    return (hi,) if lo > 0 else (lo,) if hi < 0 else (lo, hi)


def zero_tangent(sums: DualSumTotals, pair: tuple[int, int], theta_max: float) -> Tangent:
    """The tangent of a pair's objective at delta = 0, from the dual sums (no pass of its own): the value
    ||R||_1 and the slope -<sign(R), u v^T> (a subgradient: an entry with R_ij = 0 may take sign 0).
    err bounds the rounding of the sums (see ``DualSumTotals.run``) in the value, and in the slope over any
    distance as ``TangentPass`` allows for (SPAN_ERRORS); l1 is summed as finely as the tangent passes sum, so that
    this tangent is as sharp as theirs."""
    a, b = pair
    c1 = float(sums.signed[sums.powers.index(0)][a, b])  # alpha = 0: sign(R) against u v^T itself
    w_all, eps = float(sums.w_all[a, b]), sums.eps
    rounding = Rounding(eps)
    err = rounding.of_sum(sums.l1_run, sums.l1) + rounding.of_sum(sums.run, SPAN_ERRORS * theta_max * w_all)
    return Tangent(0.0, sums.l1, -c1, err)


def points(bracket: tuple[float, float], zero: Tangent) -> tuple[float, ...]:
    """Where to take a pair's tangents in a bracket: both ends; or, when the bracket holds 0, only the end on
    the side where the objective falls from 0 (the tangent at 0 is known), and none where it is flat there."""
    lo, hi = bracket
    if not lo < 0 < hi:
        return lo, hi
    return (hi,) if zero.g < 0 else (lo,) if zero.g > 0 else ()


def narrowed(tangents: list[Tangent], known: tuple[float, float] | None) -> tuple[float, float]:
    """The next bracket for a pair's tangents: TANGENT_SHRINK times narrower than the interval known to hold
    the minimum, around where the two tangents that bound it cross; or, when no such interval is known,
    the side of the tangents where the minimum is, as wide again as they span."""
    thetas = [t.theta for t in tangents]
    span = max(thetas) - min(thetas) or 1.0
    if known is None:
        if all(t.g > 0 for t in tangents):  # f rises everywhere seen: the minimum is further left
            return min(thetas) - 2 * span, min(thetas)
        return max(thetas), max(thetas) + 2 * span
    a, b = known
    left = next(t for t in tangents if t.theta == a)
    right = next(t for t in tangents if t.theta == b)
    centre = a if right.g <= left.g else (right.f - left.f + left.g * a - right.g * b) / (left.g - right.g)
    half = (b - a) / (2 * TANGENT_SHRINK)
    return max(a, centre - half), min(b, centre + half)
