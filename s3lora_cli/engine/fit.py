"""The greedy L1 rank-1 fit (spec step 4): M steps, each picking the candidate pair (a, b) and scalar delta whose
rank-1 term delta u_a v_b^T fits the residual best in L1, then deflating the residual by it.

How each step finds the pair: a small layer forms its whole residual, and one compiled call per step fits exactly
the pairs that its dual bounds cannot rule out (``whole.WholeFit``); a layer below SCREEN_MIN_ENTRIES (or
``exhaustive``) evaluates every pair exactly in one pass per step (``exact.exact_pairs``); the others evaluate only
the pairs that certified bounds cannot rule out (``screening.screened_step``). All three give the same picks; near
ties are decided in float64 (``best``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from s3lora_cli.engine import exact, kernels, screening
from s3lora_cli.engine.residual import Residual, row_chunks
from s3lora_cli.engine.state import FitState
from s3lora_cli.engine.whole import WholeFit
from s3lora_cli.spectral import Pick

SCREEN_MIN_ENTRIES = 1 << 14
"""Below this many entries every pair is evaluated in one pass: screening would cost more than it saves."""

WHOLE_MAX_ENTRIES = 1 << 18
"""Small layers: up to this many entries, each step forms the whole residual and is one compiled call (``whole``)."""


def l1_fit(
    left: torch.Tensor,
    right: torch.Tensor,
    us: torch.Tensor,
    vs: torch.Tensor,
    steps: int,
    exhaustive: bool = False,
    seed: int = 0,
) -> tuple[list[Pick], int, int]:
    """Step 4: greedy L1 rank-1 fitting of dW = left @ right with pairs (us[:, a], vs[:, b]).

    At each of ``steps`` steps every pair's delta (lower weighted median) and objective are those over all
    entries; the smallest objective wins, exact ties to the smallest a, then b; R is deflated by the pick.
    Unless ``exhaustive``, a pair is evaluated only if its certified lower bound does not already exceed
    the best objective found (``screening.BOUND_SLACK``), which leaves the pick unchanged. Returns (picks, pairs
    evaluated exactly, pairs in all).
    """
    n_u, n_v = us.shape[1], vs.shape[1]
    if n_u == 0 or n_v == 0:
        return [], 0, 0
    state = FitState(us, vs, seed)
    p, q = left, right.T  # R = p @ q^T, deflated by appending columns (see Residual.deflate)
    picks: list[Pick] = []
    exact_count = 0
    all_pairs = [(a, b) for a in range(n_u) for b in range(n_v)]
    screen = not exhaustive and p.shape[0] * q.shape[0] >= SCREEN_MIN_ENTRIES
    whole = WholeFit(us, vs) if p.shape[0] * q.shape[0] <= WHOLE_MAX_ENTRIES else None
    res, favoured = Residual(p, q), None
    for _ in range(steps):
        if whole is not None:
            evaluated = whole.step(res, exhaustive)
        elif screen:
            screened = screening.screened_step(res, us, vs, all_pairs, state, favoured)
            evaluated, favoured = screened.evaluated, screened.favoured
        else:
            evaluated = exact.exact_pairs(res, us, vs, all_pairs, state)
        exact_count += len(evaluated)
        (a, b), (delta, objective) = best(res, us, vs, evaluated)
        picks.append(Pick(a + 1, b + 1, delta, objective))
        res = res.deflate(delta, us[:, a], vs[:, b])
    return picks, exact_count, steps * len(all_pairs)


NEAR_TIE = 64
"""Objectives within NEAR_TIE * eps(dtype) (relative) of the best are compared again, summed in one order."""


def best(res: Residual, us, vs, evaluated: dict) -> tuple[tuple[int, int], tuple[float, float]]:
    """The pair with the smallest objective (ties to the smallest a, then b) and its (delta, objective).

    An objective's last bits depend on how its pass split the entries around the bracket (an entry
    inside adds weight * |ratio - delta| with the ratio rounded, one outside adds from R itself), and the
    compute-dtype residual's last bits on how the CPU's matrix product rounds. Pairs within NEAR_TIE * eps of
    the best are therefore compared on objectives decided in float64 (``objectives64``): the same bits on
    every CPU, thread count and chunking, compiled or not, so that the pick never depends on the machine.
    """
    best = min(obj for _, obj in evaluated.values())
    tie = NEAR_TIE * torch.finfo(us.dtype).eps * abs(best)
    near = sorted(pair for pair, (_, obj) in evaluated.items() if obj <= best + tie)
    if len(near) == 1:
        return near[0], evaluated[near[0]]
    summed = objectives64(res.p, res.q, us, vs, near, [evaluated[pair][0] for pair in near])
    pair = min(near, key=lambda pair: (summed[pair], pair))
    return pair, (evaluated[pair][0], summed[pair])


def objectives64(p, q, us, vs, pairs: list, deltas: list) -> dict[tuple[int, int], float]:
    """Each pair's objective sum_ij |R_ij - delta u_i v_j| decided in float64, in one order fixed by its
    definition alone, so that its bits do not depend on the CPU, the thread count, the chunking or the path:

    - R_ij = sum_l p_il q_jl, formed in float64, l ascending (for float32 factors every product is exact);
    - each term |R_ij - delta (u_i v_j)| rounded as written (the product u_i v_j first);
    - each row's terms added in eight interleaved lanes (term j to lane j mod 8), the lanes combined as
      ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) (``kernels.objectives64`` and ``_row_objectives64``);
    - the rows' sums added with ``math.fsum``, exactly rounded, hence in no particular order.
    p: [d, s], q: [k, s], us: [d, Mu], vs: [k, Mv]; pairs (a, b) 0-based with their deltas.
    """
    compiled = kernels.available and p.device.type == "cpu"
    rows_sums: list[list] = [[] for _ in pairs]
    u = us.T[[a for a, _ in pairs]].contiguous()
    v = vs.T[[b for _, b in pairs]].contiguous()
    q_np = q.contiguous().numpy() if compiled else None
    found: Any
    for rows in row_chunks(p.shape[0], q.shape[0]):
        if compiled:
            assert q_np is not None
            found = kernels.objectives64(
                p[rows].contiguous().numpy(),
                q_np,
                u[:, rows].contiguous().numpy(),
                v.numpy(),
                np.asarray(deltas, np.float64),
            )
        else:
            found = _row_objectives64(p[rows], q, u[:, rows], v, deltas)
        for sums, row_values in zip(rows_sums, found.tolist(), strict=True):
            sums.extend(row_values)
    return {pair: math.fsum(sums) for pair, sums in zip(pairs, rows_sums, strict=True)}


def _row_objectives64(p, q, u, v, deltas: list) -> torch.Tensor:
    """The tensor implementation of ``kernels.objectives64`` (same operations in the same order, the same
    bits): [P, c] per-row sums for the rows of p: [c, s] against u: [P, c], v: [P, k]."""
    f64 = torch.float64
    p64, q64 = p.to(f64), q.to(f64)
    r64 = torch.zeros(p.shape[0], q.shape[0], dtype=f64, device=p.device)
    for col in range(p.shape[1]):
        r64 += p64[:, col, None] * q64[None, :, col]
    width = -(-q.shape[0] // 8) * 8
    out = torch.empty(u.shape[0], p.shape[0], dtype=f64, device=p.device)
    for index, delta in enumerate(deltas):
        terms = torch.zeros(p.shape[0], width, dtype=f64, device=p.device)  # zero padding adds +0.0: no change
        terms[:, : q.shape[0]] = (r64 - delta * (u[index].to(f64)[:, None] * v[index].to(f64)[None, :])).abs()
        lanes = torch.zeros(p.shape[0], 8, dtype=f64, device=p.device)
        for start in range(0, width, 8):
            lanes += terms[:, start : start + 8]
        out[index] = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
            (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7])
        )
    return out
