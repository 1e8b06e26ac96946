"""Exhaustive evaluation: each candidate pair's exact delta (the lower weighted median of R_ij / (u_i v_j),
weights |u_i v_j|) and exact objective sum_ij |R_ij - delta u_i v_j| over every entry of R (spec step 4).

One pass over R serves all pairs: a sample weighted by |u_i v_j| brackets each pair's median; the pass sums the
entries below and above the bracket and keeps those inside, and a linear-time weighted selection finds the
median among them. A bracket that misses is widened and the pass repeated, so the sample only affects speed.
``pair_medians`` fits every pair at once over a list of entries (the screening's estimates, and small layers
without the compiled kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from s3lora_cli.engine import kernels
from s3lora_cli.engine.residual import Residual, read_pass, use_kernel

SAMPLE_SIZE = 1 << 14
"""Entries drawn (weighted by |u_i v_j|) to bracket each weighted median before the exact pass, at most
(``sample_size``)."""

SAMPLE_MIN = 1 << 11
"""Entries drawn for a bracket, at least."""

SAMPLE_SPARSITY = 1 << 9
"""Between SAMPLE_MIN and SAMPLE_SIZE, a layer draws one entry per SAMPLE_SPARSITY of its entries."""

BRACKET_WIDTHS = (3.5, 8.0)
"""Half-widths of the sampled bracket, in standard deviations of the sample median's rank; then all entries."""

KEEP_ALL_SAMPLES = 4
"""A residual of at most this many times its sample size entries keeps every entry in its first pass (no bracket):
drawing and sorting the sample would cost about as much as the pass it saves."""


def sample_size(entries: int) -> int:
    """The entries a layer of ``entries`` entries draws for each bracket. The brackets only order the work (a bracket
    that misses is widened): sized for a 4096 x 4096 layer, drawing and ranking them cost as much as the passes
    of a 1024 x 1024 one (measured); a smaller sample only keeps more entries inside a bracket."""
    return min(SAMPLE_SIZE, max(SAMPLE_MIN, entries // SAMPLE_SPARSITY))


def exact_pairs(
    res: Residual, us: torch.Tensor, vs: torch.Tensor, pairs: list[tuple[int, int]], state, riders: tuple = ()
) -> dict[tuple[int, int], tuple[float, float]]:
    """(delta, objective) of each pair over every entry of R, exactly; ``riders``, other consumers of a pass
    (the dual sums, tangents: see ``residual.read_pass``), are fed by the first pass, and finished by the caller.

    delta is the lower weighted median of R[i,j] / (u_i v_j) with weights |u_i v_j|; the objective is
    sum |R - delta u v^T| over all entries. One pass over R serves all pairs: entries below / above a
    sampled bracket are summed, those inside it are kept and sorted. A bracket that misses the median is
    widened and the pass repeated, so the result never depends on the sample.
    """
    result: dict[tuple[int, int], tuple[float, float]] = {}
    widths = (*BRACKET_WIDTHS, math.inf)
    small = res.p.shape[0] * res.q.shape[0] <= KEEP_ALL_SAMPLES * state.sample_size
    todo = {pair: len(BRACKET_WIDTHS) if small else 0 for pair in pairs}  # pair -> index into widths
    while todo or riders:
        found = brackets(res.p, res.q, us, vs, {pair: widths[level] for pair, level in todo.items()}, state)
        medians = Medians(us, vs, {pair: PairPass(*bracket) for pair, bracket in found.items()})
        read_pass(res, [*riders, medians])
        riders = ()
        for pair, acc in medians.passes.items():
            selected = select(acc)
            if selected is None:
                todo[pair] += 1
            else:
                result[pair] = selected
                del todo[pair]
    return result


def pair_medians(
    r: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's exact fit over the entries r [n] at rows iu and columns iv: ([Mu, Mv] deltas, [Mu, Mv]
    float64 objectives), delta the lower weighted median of r / (u v) with weights |u v| (0 where every
    weight is 0), the products and ratios in r's dtype; one compiled parallel call on the CPU."""
    f64 = torch.float64
    shape = (us.shape[1], vs.shape[1])
    if kernels.available and r.device.type == "cpu":
        deltas, objectives = map(
            torch.from_numpy,
            kernels.pair_medians(r.numpy(), us.contiguous().numpy(), vs.contiguous().numpy(), iu.numpy(), iv.numpy()),
        )
        missed = [tuple(pair) for pair in torch.isnan(deltas).nonzero().tolist()]  # row-major, as np.ndindex
        if not missed:
            return deltas, objectives
    else:
        deltas, objectives = torch.zeros(shape, dtype=f64), torch.zeros(shape, dtype=f64)
        missed = list(np.ndindex(*shape))
    ia = torch.tensor([a for a, _ in missed], device=r.device)
    ib = torch.tensor([b for _, b in missed], device=r.device)
    uv = us[iu][:, ia].T * vs[iv][:, ib].T  # [missed, n]
    w = uv.abs()
    ratio = torch.where(w > 0, r[None, :] / uv, torch.full_like(uv, math.inf))  # zero weights sort last
    delta = weighted_medians(ratio, w)
    objective = (r[None, :].to(f64) - delta.to(f64) * uv.to(f64)).abs().sum(1)
    for k, pair in enumerate(missed):
        deltas[pair], objectives[pair] = float(delta[k, 0]), float(objective[k])
    return deltas, objectives


def weighted_medians(ratio: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[P, 1]: the lower weighted median of each row of ``ratio`` [P, n] with weights ``w`` [P, n] (0 for a
    row of zero weights): a linear-time selection per row on the CPU, else one sort of all rows."""
    totals = w.sum(1, dtype=torch.float64)
    if kernels.available and ratio.device.type == "cpu":
        deltas = kernels.weighted_select_rows(ratio.numpy().copy(), w.numpy().copy(), (totals / 2).numpy())
        for k, total in enumerate(totals.tolist()):
            if total == 0:
                deltas[k] = 0.0
            elif math.isnan(deltas[k]):  # a total that rounding put a hair above the kernel's own sum
                deltas[k] = sorted_select(ratio[k], w[k], total / 2)[0]
        return torch.from_numpy(deltas).to(ratio.dtype)[:, None]
    ratio, order = ratio.sort(dim=1, stable=True)
    cum = w.gather(1, order).to(torch.float64).cumsum(1)
    idx = (cum < cum[:, -1:] / 2).sum(1, keepdim=True).clamp(max=ratio.shape[1] - 1)
    return torch.where(cum[:, -1:] > 0, ratio.gather(1, idx), torch.zeros_like(idx, dtype=ratio.dtype))


@dataclass
class PairPass:
    """Accumulators of one exact pass of one pair (a, b) over all entries, with a bracket [lo, hi]."""

    lo: float
    hi: float
    w_below: float = 0.0
    t_below: float = 0.0
    w_above: float = 0.0
    t_above: float = 0.0
    zero_weight_abs: float = 0.0
    ratios: list = field(default_factory=list)
    weights: list = field(default_factory=list)

    def add(self, sums, ratios, weights) -> None:
        self.w_below += float(sums[0])
        self.t_below += float(sums[1])
        self.w_above += float(sums[2])
        self.t_above += float(sums[3])
        self.zero_weight_abs += float(sums[4])
        self.ratios.append(torch.as_tensor(ratios))
        self.weights.append(torch.as_tensor(weights))


class Medians:
    """The consumer of a pass that feeds every pair's accumulators (``PairPass``): the compiled kernel on large
    chunks, else the tensor implementation, which forms the same ratios bit for bit."""

    absorbs_deflation = False

    def __init__(self, us: torch.Tensor, vs: torch.Tensor, passes: dict) -> None:
        self.us, self.vs, self.passes = us, vs, passes
        self.by_a: dict[int, list[int]] = {}
        for a, b in passes:
            self.by_a.setdefault(a, []).append(b)
        self.has_zero_u = {a: bool((us[:, a] == 0).any()) for a in self.by_a}
        self.has_zero_v = {b: bool((vs[:, b] == 0).any()) for _, b in passes}
        self.scratch: dict = {}
        self._kernel_side: tuple | None = None  # contiguous candidate vectors for the kernel

    def add(self, rows: slice, chunk: torch.Tensor, owed: tuple | None = None) -> None:
        if use_kernel(chunk):
            if self._kernel_side is None:
                self._kernel_side = (self.us.T.contiguous().numpy(), self.vs.T.contiguous().numpy())
            us_rows, vs_cols = self._kernel_side
            r_np = chunk.numpy()
            for (a, b), acc in self.passes.items():
                acc.add(*kernels.bracket_pass(r_np, us_rows[a, rows], vs_cols[b], acc.lo, acc.hi, self.scratch))
            return
        for a, bs in self.by_a.items():
            self._add_tensors(rows, chunk, a, bs)

    def _add_tensors(self, rows: slice, chunk: torch.Tensor, a: int, bs: list[int]) -> None:
        f64 = torch.float64
        u = self.us[rows, a]
        u_abs = u.abs()
        signed_rows = chunk * u.sign()[:, None]
        for b in bs:
            acc = self.passes[(a, b)]
            v = self.vs[:, b]
            t = signed_rows * v.sign()[None, :]  # t = w * ratio
            w = u_abs[:, None] * v.abs()[None, :]  # w = |u_i v_j|
            ratio = t / w  # = R / (u_i v_j), bit for bit; NaN where w = 0
            below = ratio < acc.lo
            above = ratio > acc.hi
            inside = ~(below | above) & (w > 0)
            zero: float | torch.Tensor = 0.0
            if self.has_zero_u[a] or self.has_zero_v[b]:  # entries with u_i v_j = 0 count |R_ij|
                zero = (chunk.abs() * (w == 0)).sum(dtype=f64)
            sums = (
                (w * below).sum(dtype=f64),
                (t * below).sum(dtype=f64),
                (w * above).sum(dtype=f64),
                (t * above).sum(dtype=f64),
                zero,
            )
            acc.add(sums, ratio[inside], w[inside])


def select(acc: PairPass) -> tuple[float, float] | None:
    """The lower weighted median and the objective from one pass, or None if the bracket missed."""
    ratios, weights = torch.cat(acc.ratios), torch.cat(acc.weights)
    inside_weight = float(weights.sum(dtype=torch.float64))
    total = acc.w_below + inside_weight + acc.w_above
    if total == 0.0:  # every weight is zero: the objective does not depend on delta
        return 0.0, acc.zero_weight_abs
    half = total / 2
    if acc.w_below >= half or acc.w_below + inside_weight < half:
        return None
    delta = math.nan
    if ratios.device.type == "cpu" and kernels.available:
        delta, inside = kernels.weighted_select(ratios.numpy(), weights.numpy(), half - acc.w_below)
    if math.isnan(delta):  # no kernel, or a total that rounding put a hair above the kernel's own sum
        delta, inside = sorted_select(ratios, weights, half - acc.w_below)
    objective = (delta * acc.w_below - acc.t_below) + (acc.t_above - delta * acc.w_above) + inside + acc.zero_weight_abs
    return delta, objective


def sorted_select(ratios: torch.Tensor, weights: torch.Tensor, half: float) -> tuple[float, float]:
    """The first ratio in ascending order whose cumulative weight reaches ``half``, and the sum of
    weight * |ratio - it|."""
    order = torch.argsort(ratios)
    ratios, weights = ratios[order], weights[order].to(torch.float64)
    cum = torch.cumsum(weights, 0)
    idx = int(torch.searchsorted(cum, torch.tensor([half], dtype=cum.dtype, device=cum.device)))
    delta = float(ratios[min(idx, ratios.numel() - 1)])
    return delta, float((weights * (ratios.to(torch.float64) - delta).abs()).sum())


def brackets(
    p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, widths: dict, state
) -> dict[tuple[int, int], tuple[float, float]]:
    """For each pair (a, b) in ``widths``, a range likely to hold the weighted median of R/(u v^T): quantiles
    of a sample drawn with probability proportional to |u_i v_j| (rows and columns drawn independently; one
    draw of rows per a and of columns per b serves all pairs), ``widths[pair]`` standard deviations of the
    sample median's rank either side of it. The rows and columns are the fit's draws (``state``), the same at
    every step."""
    n = state.sample_size
    found = {pair: (-math.inf, math.inf) for pair, width in widths.items() if width == math.inf}
    sampled = [pair for pair, width in widths.items() if width != math.inf]
    if not sampled:
        return found
    ranks = {}
    for pair in sampled:
        half = widths[pair] * math.sqrt(n) / 2
        ranks[pair] = (max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half)))
    if kernels.available and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64):
        rows, cols = state.all_weighted("u", us).numpy(), state.all_weighted("v", vs).numpy()
        table = np.array([(a, b, *ranks[a, b]) for a, b in sampled], dtype=np.int64)
        ends = kernels.sample_brackets(
            p.contiguous().numpy(),
            q.contiguous().numpy(),
            us.contiguous().numpy(),
            vs.contiguous().numpy(),
            rows,
            cols,
            table,
        )
        found.update((pair, (float(lo), float(hi))) for pair, (lo, hi) in zip(sampled, ends.tolist(), strict=True))
        return found
    for a, b in sampled:
        i, j = state.weighted("u", us, a), state.weighted("v", vs, b)
        ratios = (p[i] * q[j]).sum(1) / (us[i, a] * vs[j, b])
        found[a, b] = order_statistics(ratios, *ranks[a, b])
    return found


def order_statistics(x: torch.Tensor, k_lo: int, k_hi: int) -> tuple[float, float]:
    """The k_lo-th and k_hi-th smallest entries of x (0-based): one partial sort on the CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        found = np.partition(x.numpy(), (k_lo, k_hi))
        return float(found[k_lo]), float(found[k_hi])
    return float(torch.kthvalue(x, k_lo + 1).values), float(torch.kthvalue(x, k_hi + 1).values)


def weighted_indices(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices into x drawn with replacement, index i with probability |x_i| / sum |x| (by inverting the
    cumulative sum: several times faster than torch.multinomial); x has a nonzero entry."""
    cdf = x.abs().to(torch.float64).cumsum(0)
    draws = torch.rand(n, dtype=torch.float64, generator=gen, device=x.device) * cdf[-1]
    if kernels.available and x.device.type == "cpu":  # the same indices, from a guide table (~10x faster)
        return torch.from_numpy(kernels.inverse_cdf(cdf.numpy(), draws.numpy()))
    return torch.searchsorted(cdf, draws, right=True).clamp_(max=x.numel() - 1)
