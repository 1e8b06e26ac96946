"""Certified dual lower bounds on every pair's objective at one step of the fit, all pairs from one pass over R.

Derivation. By L1 duality, min_delta ||R - delta u v^T||_1 >= <W, R> for any W with |W_ij| <= 1 and
<W, u v^T> = 0. For a correction direction E with sign(E_ij) = sign(u_i v_j) and max |E_ij| = 1,
W = sign(R) (1 - |tau| |E|) - tau E is one whenever |tau| <= 1, with tau from <W, u v^T> = 0:
tau = c1 / (c3 + sign(c1) c2), c1 = <sign(R), u v^T>, c2 = <sign(R) |E|, u v^T>, c3 = <E, u v^T>;
then bound = ||R||_1 - |tau| <|E|, |R|> - tau <E, R>. E = sign(u v^T) |u|^alpha |v^T|^alpha / norm for alpha
in BOUND_POWERS (alpha = 0 spreads the correction evenly; larger alpha puts it on the entries with large
|u_i v_j|, which are the ones whose sign a small delta flips); each pair keeps its best bound.

What needs R: ||R||_1 and, for every alpha, sign(R) and |R| projected on the candidates' powers (``DualSums``,
a consumer of ``residual.read_pass``, which also subtracts the previous pick from a kept chunk in its own
loop); <E, R> comes from the factors. What needs only the candidates is ``BoundTerms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from s3lora_cli.engine import kernels
from s3lora_cli.engine.residual import subtract, use_kernel

BOUND_POWERS = (0, 2)
"""The dual certificates tried for every pair: the correction direction E = sign(u v^T) |u|^alpha |v^T|^alpha
for each alpha here; each pair keeps its best bound. alpha = 0 comes first and is always taken (its sums also
give the tangent at 0, see ``tangents.zero_tangent``)."""

BOUND_BLOCK_ENTRIES = 1 << 18
"""The tensor implementation takes sign(R) and |R| this many entries at a time (1 MiB in float32), small
enough to stay in cache between the sign / abs and the products (memory-bound else)."""

FEW_COLUMNS = 8
"""BLAS multiplies by at most this many columns ~2x faster when they are stored column-major (measured)."""


@dataclass(frozen=True)
class DualBounds:
    """Every pair's certified lower bound ``lower`` [Mu, Mv] (-inf where no certificate applies), and the sums it
    came from (which also give each pair's tangent at 0)."""

    lower: torch.Tensor
    sums: DualSumTotals

    @classmethod
    def of(cls, sums: DualSumTotals, p: torch.Tensor, q: torch.Tensor, state) -> DualBounds:
        """The bounds of the module docstring from the sums over R = p @ q^T and the candidates' terms."""
        f64 = torch.float64
        p64, q64 = p.to(f64), q.to(f64)
        best = torch.full(state.w_all.shape, -math.inf, dtype=f64, device=p.device)
        c1 = sums.signed[sums.powers.index(0)]
        for k, alpha in enumerate(sums.powers):
            terms = state.bound_terms(alpha)
            norm, c3 = terms.norm, terms.c3
            c2 = sums.signed[k] / norm
            e_r = (terms.u_dir @ p64) @ (q64.T @ terms.v_dir) / norm  # <E, R>, from the factors
            e_abs_r = sums.absolute[k] / norm
            tau = c1 / (c3 + c1.sign() * c2)
            bound = sums.l1 - tau.abs() * e_abs_r - tau * e_r
            valid = (tau.abs() <= 1) & (norm > 0) & (c3 > 0)
            best = torch.maximum(best, torch.where(valid, bound, torch.full_like(bound, -math.inf)))
        return cls(best.cpu(), sums)


@dataclass(frozen=True)
class DualSumTotals:
    """The sums of one pass that the dual bounds need, contracted with the candidates u, in float64."""

    powers: tuple
    l1: float
    """||R||_1."""
    run: int
    """The longest run of terms the projections added in the compute dtype (their rounding is within
    ``Rounding.of_sum(run, ...)`` of their terms' magnitudes)."""
    l1_run: int
    """The same for l1."""
    signed: list
    """[alpha]: [Mu, Mv], sum_ij sign(R_ij) u_i |u_i|^alpha v_j |v_j|^alpha."""
    absolute: list
    """[alpha]: [Mu, Mv], sum_ij |R_ij| |u_i|^alpha |v_j|^alpha (|x|^0 is 1 for x != 0, else 0)."""
    w_all: torch.Tensor
    """[Mu, Mv]: sum_ij |u_i v_j| = ||u||_1 ||v||_1 of every pair."""
    eps: float
    """eps of the compute dtype."""


@dataclass
class DualSums:
    """The consumer of a pass that sums what the dual bounds need over R (see the module docstring): per row,
    sign(R) and |R| projected on v |v|^alpha and |v|^alpha; ``finish`` contracts the rows with u."""

    vs: torch.Tensor
    powers: tuple = BOUND_POWERS
    absorbs_deflation = True
    run: int = 0
    l1_run: int = 0
    _rows: list = field(default_factory=list, init=False, repr=False)
    """(sign(R) and |R| projections, row sums of |R|) of the rows added, in order, until ``finish``."""
    _v_side: tuple | None = field(default=None, init=False, repr=False)
    _v_rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def _prepare(self) -> tuple:
        """The right-hand sides of the products, the same for every chunk: sign(R) goes on
        v |v|^alpha for every alpha; |R| on |v|^alpha for every alpha except 0 when no entry of the
        candidates is zero (|v|^0 is then all ones and the product is the row sums of |R|)."""
        if self._v_side is None:
            vs = self.vs
            v_pow = [power(vs, alpha) for alpha in self.powers]
            dense = bool((vs != 0).all())
            abs_powers = [k for k, alpha in enumerate(self.powers) if not (dense and alpha == 0)]
            v_signed = torch.cat([vs * pw for pw in v_pow], dim=1)  # [k, n * Mv]
            v_abs = torch.cat([v_pow[k] for k in abs_powers], dim=1) if abs_powers else vs[:, :0]
            if v_abs.shape[1] <= FEW_COLUMNS:
                v_abs = v_abs.T.contiguous().T
            self._v_side = (v_signed, v_abs, abs_powers)
        return self._v_side

    def add(self, rows: slice, chunk: torch.Tensor, owed: tuple | None = None) -> None:
        """Add one chunk's sums; ``owed`` (du, v), if given, is first subtracted from the chunk in place."""
        v_signed, v_abs, _ = self._prepare()
        if use_kernel(chunk):
            if self._v_rows is None:  # the kernel's layout: one contiguous row per right-hand side
                self._v_rows = (v_signed.T.contiguous().numpy(), v_abs.T.contiguous().numpy())
            deflation = (owed[0].contiguous().numpy(), owed[1].contiguous().numpy()) if owed is not None else None
            s_proj, a_proj, l1 = map(
                torch.from_numpy, kernels.dual_sums(chunk.numpy(), self._v_rows[0], self._v_rows[1], deflation)
            )
            self.run, self.l1_run = max(self.run, kernels.DUAL_RUN), max(self.l1_run, kernels.SUM_BLOCK)
        else:  # a product or sum over a row, in any order
            self.run, self.l1_run = max(self.run, chunk.shape[1]), max(self.l1_run, chunk.shape[1])
            if owed is not None:
                subtract(chunk, *owed)
            s_proj, a_proj, l1 = self._products(chunk, v_signed, v_abs)
        self._rows.append((s_proj, a_proj, l1))

    def finish(self, state) -> DualSumTotals:
        """Contract the rows' projections with the candidates u, once all chunks (every row, in order) are in."""
        m_v = self.vs.shape[1]
        _, _, abs_powers = self._prepare()
        s_proj, a_proj, l1 = (torch.cat(part).to(torch.float64) for part in zip(*self._rows, strict=True))
        self._rows = []
        a_parts = dict(zip(abs_powers, a_proj.split(m_v, 1) if abs_powers else (), strict=True))
        signed, absolute = [], []
        for k, s_k in enumerate(s_proj.split(m_v, 1)):
            terms = state.bound_terms(self.powers[k])
            signed.append(terms.u_signed @ s_k)
            if k in a_parts:
                absolute.append(terms.u_pow.T @ a_parts[k])
            else:  # alpha = 0 and no v_j is zero: sum_ij |R_ij| [u_i != 0] from the row sums
                absolute.append((terms.u_pow.T @ l1[:, None]).expand(-1, m_v))
        return DualSumTotals(
            self.powers,
            float(l1.sum()),
            self.run,
            self.l1_run,
            signed,
            absolute,
            state.w_all,
            torch.finfo(self.vs.dtype).eps,
        )

    @staticmethod
    def _products(chunk: torch.Tensor, v_signed: torch.Tensor, v_abs: torch.Tensor) -> tuple:
        """sign(R) @ v_signed, |R| @ v_abs and the row sums of |R|, in R's dtype (the tensor implementation)."""
        s_proj = torch.empty(chunk.shape[0], v_signed.shape[1], dtype=chunk.dtype, device=chunk.device)
        a_proj = torch.empty(chunk.shape[0], v_abs.shape[1], dtype=chunk.dtype, device=chunk.device)
        l1 = torch.empty(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
        step = max(1, BOUND_BLOCK_ENTRIES // max(chunk.shape[1], 1))
        for start in range(0, chunk.shape[0], step):
            block = chunk[start : start + step]
            sign, magnitude = block.sign(), block.abs()
            torch.matmul(sign, v_signed, out=s_proj[start : start + step])
            if a_proj.shape[1]:
                torch.matmul(magnitude, v_abs, out=a_proj[start : start + step])
            torch.sum(magnitude, 1, out=l1[start : start + step])
        return s_proj, a_proj, l1


def power(x: torch.Tensor, alpha: int) -> torch.Tensor:
    """|x|^alpha elementwise, with |x|^0 = 1 where x != 0 and 0 where x = 0."""
    return (x != 0).to(x.dtype) if alpha == 0 else x.abs() ** alpha


@dataclass(frozen=True)
class BoundTerms:
    """What the dual bound of one power alpha takes from the candidates alone (see the module docstring), in float64."""

    u_pow: torch.Tensor
    """[d, Mu]: |u|^alpha."""
    u_signed: torch.Tensor
    """[Mu, d]: (u |u|^alpha)^T, against the rows' projections of sign(R)."""
    u_dir: torch.Tensor
    """[Mu, d]: (sign(u) |u|^alpha)^T: E's factor on the left."""
    v_dir: torch.Tensor
    """[k, Mv]: sign(v) |v|^alpha: E's factor on the right."""
    norm: torch.Tensor
    """[Mu, Mv]: max |u_i|^alpha max |v_j|^alpha, which scales E to max |E| = 1."""
    c3: torch.Tensor
    """[Mu, Mv]: <E, u v^T>."""

    @classmethod
    def of(cls, us64: torch.Tensor, vs64: torch.Tensor, alpha: int) -> BoundTerms:
        u_pow, v_pow = power(us64, alpha), power(vs64, alpha)
        norm = u_pow.amax(0)[:, None] * v_pow.amax(0)[None, :]
        c3 = ((us64.abs() * u_pow).sum(0)[:, None] * (vs64.abs() * v_pow).sum(0)[None, :]) / norm
        return cls(
            u_pow, (us64 * u_pow).T.contiguous(), (us64.sign() * u_pow).T.contiguous(), vs64.sign() * v_pow, norm, c3
        )
