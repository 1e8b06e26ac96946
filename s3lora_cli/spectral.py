"""Pure tensor math of S3LoRA: MAS-SVD with its exact L1 rank-1 fit, SSI, and the ablation spectra.

Everything here works on the low-rank factors of a LoRA update, dW = left @ right with left: [d, q] and
right: [q, k] (q is small), and never forms a d x k matrix except one bounded chunk of rows at a time.
The functions take tensors and return tensors or frozen dataclasses; they run on whatever device their
inputs live on. Equation numbers refer to the paper; step numbers to ``shared/spec/MAS-SVD.md``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from s3lora_cli import kernels

EPS_NORM = 1e-8
"""eps_n: added to every row and column norm before dividing (paper Eq. 1-2)."""

EPS_SSI = 1e-6
"""eps_s: added to the denominator of SSI (paper Eq. 4)."""

DEFAULT_COMPONENTS = 8
"""M defaults to min(8, r) for a layer of rank r; h defaults to M."""

CHUNK_ENTRIES = 1 << 20
"""Entries of the residual materialised at once by the L1 fit: bounds its working set."""

SAMPLE_SIZE = 1 << 14
"""Entries drawn (weighted by |u_i v_j|) to bracket each weighted median before the exact pass."""

ESTIMATE_SAMPLE = 1 << 12
"""Entries drawn uniformly to estimate every pair's objective, which orders the exact work."""

BRACKET_Z = 3.0
"""Half-width, in standard deviations of the sample median's rank, of the bracket where a pair's first
tangent bounds are taken (see ``_brackets`` and ``_screened``)."""

TANGENT_ROUNDS = 4
"""Passes of tangent bounds per step at most (see ``_screened``)."""

TANGENT_SHRINK = 8.0
"""Each tangent round narrows a pair's bracket by this factor around the minimum."""

EARLY_GAIN = 0.05
"""See ``_early_pairs``."""

EARLY_PAIRS = 8
"""See ``_early_pairs``."""

TANGENT_MIN_GAIN = 0.25
"""Tangent rounds stop once a round rules out fewer than this fraction of the pairs left."""

SCREEN_MIN_ENTRIES = 1 << 14
"""Below this many entries every pair is evaluated in one pass: screening would cost more than it saves."""

BATCHED_MAX_ENTRIES = 1 << 21
"""Small layers: when entries x pairs is at most this, each pair's median is selected over all its ratios at once."""

BOUND_BLOCK_ENTRIES = 1 << 18
"""The dual bounds' sums take sign(R) and |R| this many entries at a time (1 MiB in float32)."""

CACHE_ENTRIES = 1 << 26
"""Up to this many entries of the residual (256 MiB in float32) are formed once per step of the fit, not once
per pass: all of them for layers up to this size, the first rows of larger ones."""

KERNEL_MIN_ENTRIES = 1 << 16
"""Chunks at least this large use the compiled CPU kernel (when numba is available)."""

_BRACKET_WIDTHS = (3.5, 8.0)
"""Half-widths of the sampled bracket, in standard deviations of the sample median's rank; then all entries."""


class Method(str, enum.Enum):
    """Which singular values feed SSI (paper Table 5)."""

    MAS_SVD = "mas-svd"
    SPSVD = "spsvd"
    SVD = "svd"


@dataclass(frozen=True)
class Pick:
    """One greedy step of the L1 fit: candidate pair (a, b), 1-based as in the spec, and its scalar delta."""

    a: int
    b: int
    delta: float
    objective: float
    """sum over all i, j of |R[i,j] - delta u_i v_j| at the time of the pick."""


@dataclass(frozen=True)
class Spectrum:
    """The spectral analysis of one LoRA update.

    sigma: the singular values S' that enter SSI, largest first ([h] at most).
    ssi: S'_1 / (S'_1 + ... + S'_h + eps_s) (paper Eq. 4).
    picks: the greedy L1 picks (empty for ``svd``).
    candidates: (number of left candidates, number of right candidates) actually used; fewer than M when
        dW has rank below M (directions with zero singular value are not unique and are left out).
    pairs_exact: how many (pair, step) objectives were evaluated over every entry; the others were ruled
        out by a certified lower bound.
    """

    sigma: tuple[float, ...]
    ssi: float
    picks: tuple[Pick, ...]
    candidates: tuple[int, int]
    pairs_exact: int
    pairs_total: int


def ssi(sigma: torch.Tensor, top_h: int) -> float:
    """SSI = sigma_1 / (sigma_1 + ... + sigma_h + eps_s) (paper Eq. 4); sigma sorted descending."""
    s = sigma.to(torch.float64)[:top_h]
    if s.numel() == 0:
        return 0.0
    return float(s[0] / (s.sum() + EPS_SSI))


def lowrank_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of X = left @ right (left: [d, q], right: [q, k]) without forming X.

    Returns U: [d, p], S: [p], V: [k, p] with X = U diag(S) V^T, S descending, p = min(d, k, q).
    """
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u_core, s, q_right @ vh_core.T


def row_norms(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||X[i, :]||_2 for X = left @ right: [d], from the factors.

    A row that is zero in exact arithmetic (left[i] orthogonal to the row space of right) comes out as
    rounding noise; norms below that noise floor are returned as exactly 0.
    """
    _, r_right = torch.linalg.qr(right.T)
    norms = torch.linalg.vector_norm(left @ r_right.T, dim=1)
    return _zero_below_noise(norms, torch.linalg.vector_norm(left, dim=1), r_right)


def col_norms(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||X[:, j]||_2 for X = left @ right: [k], from the factors (noise floor as in ``row_norms``)."""
    _, r_left = torch.linalg.qr(left)
    norms = torch.linalg.vector_norm(r_left @ right, dim=0)
    return _zero_below_noise(norms, torch.linalg.vector_norm(right, dim=0), r_left)


def _zero_below_noise(norms: torch.Tensor, factor_norms: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    scale = float(torch.linalg.matrix_norm(core, ord=2)) if core.numel() else 0.0
    floor = 4 * max(core.shape[-1], 1) * torch.finfo(norms.dtype).eps * scale * factor_norms
    return torch.where(norms > floor, norms, torch.zeros_like(norms))


RANK_RTOL = 1e-10
"""A singular value below RANK_RTOL times the largest (of the float64 small-factor SVD) counts as zero:
well above the rounding noise of a rank-deficient product of factors, far below any real direction."""


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > float(s[0]) * RANK_RTOL).sum())


def svd_spectrum(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of dW = left @ right, largest first (the ``svd`` ablation)."""
    return lowrank_svd(left, right)[1]


def mas_svd_candidates(left: torch.Tensor, right: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3: Uc, the top left singular vectors of Wh: [d, <=M], and Vc, the top right singular
    vectors of Wt: [k, <=M], where Wt is dW with unit rows (Eq. 1) and Wh is Wt with unit columns (Eq. 2).

    Directions whose singular value is numerically zero are dropped (they are not unique).
    """
    # Wt = left_t @ right and Wh = left_t @ right_h; rows / columns of dW that are zero stay zero
    rn = row_norms(left, right)
    left_t = torch.where(rn[:, None] > 0, left / (rn + EPS_NORM)[:, None], torch.zeros_like(left))
    cn = col_norms(left_t, right)
    right_h = torch.where(cn[None, :] > 0, right / (cn + EPS_NORM)[None, :], torch.zeros_like(right))
    _, s_t, v_t = lowrank_svd(left_t, right)
    u_h, s_h, _ = lowrank_svd(left_t, right_h)
    n_v = min(components, _numerical_rank(s_t))
    n_u = min(components, _numerical_rank(s_h))
    return u_h[:, :n_u], v_t[:, :n_v]


def magnitude(left: torch.Tensor, right: torch.Tensor) -> float:
    """Step 6: rbar * cbar, the mean row norm times the mean column norm of dW itself (paper Eq. 3)."""
    return float(row_norms(left, right).mean(dtype=torch.float64) * col_norms(left, right).mean(dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# The exact L1 rank-1 fit (step 4)
# --------------------------------------------------------------------------------------------------


@dataclass
class _PairPass:
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


BOUND_POWERS = (0, 2)
"""The dual certificates tried for every pair (see ``_lower_bounds``): the correction direction
E = sign(u v^T) |u|^alpha |v^T|^alpha for each alpha here; each pair keeps its best bound. alpha = 0
comes first and is always taken (its sums also give the tangent at 0, see ``_zero_tangent``)."""

NEAR_TIE_GAIN = 0.02
"""Steps whose best estimated gain (||R||_1 minus the objective) is below this fraction of ||R||_1 are near ties:
there the screening takes the dual bounds of every alpha in BOUND_POWERS (alpha = 2 rules out pairs that
alpha = 0 leaves) before any exact pair (see ``_screened``); at the other steps alpha = 0 alone rules out as
many (measured on the generated adapters), in a third of the sums."""


@dataclass
class _BoundSums:
    """What the dual lower bounds need from a pass over R: ||R||_1, and for every alpha in ``powers``
    sign(R) and |R| projected on the candidates' powers (see ``_lower_bounds``)."""

    powers: tuple = BOUND_POWERS
    l1: float = 0.0
    run: int = 0
    """The longest run of terms the projections added in the compute dtype (their rounding is within
    (run + 2) eps of their terms' magnitudes)."""
    l1_run: int = 0
    """The same for l1."""
    signed: list = field(default_factory=list)
    """[alpha]: [Mu, Mv], sum_ij sign(R_ij) u_i |u_i|^alpha v_j |v_j|^alpha."""
    absolute: list = field(default_factory=list)
    """[alpha]: [Mu, Mv], sum_ij |R_ij| |u_i|^alpha |v_j|^alpha (|x|^0 is 1 for x != 0, else 0)."""

    w_all: torch.Tensor | None = None
    """[Mu, Mv]: sum_ij |u_i v_j| = ||u||_1 ||v||_1 of every pair."""
    eps: float = 0.0
    """eps of the compute dtype."""
    _rows: list = field(default_factory=list, init=False, repr=False)
    """(sign(R) and |R| projections, row sums of |R|) of the rows added, in order, until ``finish``."""
    _v_side: tuple | None = field(default=None, init=False, repr=False)
    _v_rows: tuple | None = field(default=None, init=False, repr=False)

    def _prepare(self, vs: torch.Tensor) -> tuple:
        """The right-hand sides of the products, the same for every chunk: sign(R) goes on
        v |v|^alpha for every alpha; |R| on |v|^alpha for every alpha except 0 when no entry of the
        candidates is zero (|v|^0 is then all ones and the product is the row sums of |R|)."""
        if self._v_side is None:
            v_pow = [_power(vs, alpha) for alpha in self.powers]
            dense = bool((vs != 0).all())
            abs_powers = [k for k, alpha in enumerate(self.powers) if not (dense and alpha == 0)]
            v_signed = torch.cat([vs * pw for pw in v_pow], dim=1)  # [k, n * Mv]
            v_abs = torch.cat([v_pow[k] for k in abs_powers], dim=1) if abs_powers else vs[:, :0]
            if v_abs.shape[1] <= 8:  # BLAS multiplies by a few columns ~2x faster stored column-major (measured)
                v_abs = v_abs.T.contiguous().T
            self._v_side = (v_signed, v_abs, abs_powers)
        return self._v_side

    def add(self, r_chunk: torch.Tensor, vs: torch.Tensor, owed: tuple | None = None) -> None:
        """Add one chunk's sums; ``owed`` (du, v), if given, is first subtracted from the chunk in place
        (see ``_Residual.owing_chunks``)."""
        v_signed, v_abs, _ = self._prepare(vs)
        if _use_kernel(r_chunk):
            if self._v_rows is None:  # the kernel's layout: one contiguous row per right-hand side
                self._v_rows = (v_signed.T.contiguous().numpy(), v_abs.T.contiguous().numpy())
            deflation = (owed[0].contiguous().numpy(), owed[1].contiguous().numpy()) if owed is not None else None
            s_proj, a_proj, l1 = map(torch.from_numpy, kernels.dual_sums(r_chunk.numpy(), *self._v_rows, deflation))
            self.run, self.l1_run = max(self.run, kernels.DUAL_RUN), max(self.l1_run, kernels.SUM_BLOCK)
        else:  # a product or sum over a row, in any order
            self.run, self.l1_run = max(self.run, r_chunk.shape[1]), max(self.l1_run, r_chunk.shape[1])
            if owed is not None:
                _subtract(r_chunk, *owed)
            s_proj, a_proj, l1 = self._products(r_chunk, v_signed, v_abs)
        self._rows.append((s_proj, a_proj, l1))

    def finish(self, state: _FitState) -> None:
        """Contract the rows' projections with the candidates u, once all chunks (every row, in order) are in."""
        m_v = state.vs.shape[1]
        _, _, abs_powers = self._prepare(state.vs)
        s_proj, a_proj, l1 = (torch.cat(part).to(torch.float64) for part in zip(*self._rows, strict=True))
        self._rows = []
        self.l1 = float(l1.sum())
        self.w_all = state.w_all
        self.eps = torch.finfo(state.vs.dtype).eps
        a_parts = dict(zip(abs_powers, a_proj.split(m_v, 1) if abs_powers else (), strict=True))
        self.signed, self.absolute = [], []
        for k, s_k in enumerate(s_proj.split(m_v, 1)):
            terms = state.bound_terms(self.powers[k])
            self.signed.append(terms.u_signed @ s_k)
            if k in a_parts:
                self.absolute.append(terms.u_pow.T @ a_parts[k])
            else:  # alpha = 0 and no v_j is zero: sum_ij |R_ij| [u_i != 0] from the row sums
                self.absolute.append((terms.u_pow.T @ l1[:, None]).expand(-1, m_v))

    @staticmethod
    def _products(r_chunk: torch.Tensor, v_signed: torch.Tensor, v_abs: torch.Tensor) -> tuple:
        """sign(R) @ v_signed, |R| @ v_abs and the row sums of |R|, in R's dtype (the tensor implementation)."""
        s_proj = torch.empty(r_chunk.shape[0], v_signed.shape[1], dtype=r_chunk.dtype, device=r_chunk.device)
        a_proj = torch.empty(r_chunk.shape[0], v_abs.shape[1], dtype=r_chunk.dtype, device=r_chunk.device)
        l1 = torch.empty(r_chunk.shape[0], dtype=r_chunk.dtype, device=r_chunk.device)
        # blocks of rows small enough to stay in cache between sign / abs and the products (memory-bound else)
        step = max(1, BOUND_BLOCK_ENTRIES // max(r_chunk.shape[1], 1))
        for start in range(0, r_chunk.shape[0], step):
            block = r_chunk[start:start + step]
            sign, magnitude = block.sign(), block.abs()
            torch.matmul(sign, v_signed, out=s_proj[start:start + step])
            if a_proj.shape[1]:
                torch.matmul(magnitude, v_abs, out=a_proj[start:start + step])
            torch.sum(magnitude, 1, out=l1[start:start + step])
        return s_proj, a_proj, l1


def _power(x: torch.Tensor, alpha: int) -> torch.Tensor:
    """|x|^alpha elementwise, with |x|^0 = 1 where x != 0 and 0 where x = 0."""
    return (x != 0).to(x.dtype) if alpha == 0 else x.abs() ** alpha


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ENTRIES // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


class _Residual:
    """R = p @ q^T (p: [d, s], q: [k, s]) at one step of the fit, handed out a chunk of rows at a time.

    The chunks are the only place entries of R are formed. Every pass of a step sees the same values: the
    first chunks, as many as fit in CACHE_ENTRIES entries (all of them for most layers), are kept after the
    first pass, and the next step's residual is made from them by subtracting the pick in place, each chunk
    just before its first use in that step (in the same pass as the dual sums, see ``_accumulate``); the
    others are formed again in the same way from the factors in every pass (a bounded working set).
    """

    def __init__(self, p: torch.Tensor, q: torch.Tensor) -> None:
        self.p, self.q = p, q
        self._cache: list = []
        self._complete = False  # the first pass is over: the cache holds every chunk that fits
        self._owed: set = set()  # cached chunks that still owe the previous pick's subtraction
        self._pick: tuple | None = None  # (delta u, v) of the previous pick

    def chunks(self):
        """(rows, chunk) of R, every row once. A chunk that is not kept (past CACHE_ENTRIES) is valid only
        until the next one is asked for."""
        for rows, chunk, owed in self.owing_chunks():
            if owed is not None:
                _subtract(chunk, *owed)
            yield rows, chunk

    def owing_chunks(self):
        """(rows, chunk, owed) as in ``chunks``, except that a cached chunk may still owe the previous pick:
        owed = (delta u[rows], v), or None; the caller subtracts it in place (``_subtract``, or a kernel that
        does the same in its own pass, bit for bit) before anything reads the chunk."""
        all_rows = list(_row_chunks(self.p.shape[0], self.q.shape[0]))
        if self._complete:
            for index, (rows, chunk) in enumerate(self._cache):
                owed = None
                if index in self._owed:
                    self._owed.discard(index)
                    owed = (self._pick[0][rows], self._pick[1])
                yield rows, chunk, owed
            scratch = None
            for rows in all_rows[len(self._cache):]:
                scratch = self._form(rows, scratch)
                yield rows, scratch, None
            return
        self._cache, caching, room, scratch = [], True, CACHE_ENTRIES, None
        for rows in all_rows:
            n = (rows.stop - rows.start) * self.q.shape[0]
            caching = caching and n <= room
            if caching:
                self._cache.append((rows, self._form(rows)))
                room -= n
                yield *self._cache[-1], None
            else:
                scratch = self._form(rows, scratch)
                yield rows, scratch, None
        self._complete = True

    def _form(self, rows: slice, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """R[rows] from the factors; a chunk that is not kept is formed in ``scratch`` (the previous one's
        memory, so that a pass does not allocate per chunk): it is valid until the next one is asked for."""
        if scratch is None:
            return self.p[rows] @ self.q.T
        out = scratch.view(-1)[:(rows.stop - rows.start) * self.q.shape[0]].view(-1, self.q.shape[0])
        return torch.matmul(self.p[rows], self.q.T, out=out)

    def deflate(self, delta: float, u: torch.Tensor, v: torch.Tensor) -> _Residual:
        """The next step's residual, R - delta u v^T (u: [d], v: [k]); this one is used up."""
        following = _Residual(torch.cat([self.p, -delta * u[:, None]], dim=1), torch.cat([self.q, v[:, None]], dim=1))
        if self._complete:
            for index in self._owed:  # a chunk no pass of this step read: it owes this step's pick as well
                rows, chunk = self._cache[index]
                _subtract(chunk, self._pick[0][rows], self._pick[1])
            following._cache, following._complete = self._cache, True
            following._owed, following._pick = set(range(len(self._cache))), (delta * u, v)
            self._cache, self._complete, self._owed = [], False, set()
        return following


def _subtract(chunk: torch.Tensor, du: torch.Tensor, v: torch.Tensor) -> None:
    """chunk -= du v^T in place, the product rounded first (as ``kernels.dual_sums`` does when it deflates)."""
    chunk.sub_(du[:, None] * v[None, :])


@dataclass(frozen=True)
class _BoundTerms:
    """What the dual bound of one power alpha takes from the candidates alone (see ``_lower_bounds``), in float64."""

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
    def of(cls, us64: torch.Tensor, vs64: torch.Tensor, alpha: int) -> _BoundTerms:
        u_pow, v_pow = _power(us64, alpha), _power(vs64, alpha)
        norm = u_pow.amax(0)[:, None] * v_pow.amax(0)[None, :]
        c3 = ((us64.abs() * u_pow).sum(0)[:, None] * (vs64.abs() * v_pow).sum(0)[None, :]) / norm
        return cls(u_pow, (us64 * u_pow).T.contiguous(), (us64.sign() * u_pow).T.contiguous(), vs64.sign() * v_pow,
                   norm, c3)


class _FitState:
    """What one fit keeps between its steps, all of it from the candidates us: [d, Mu] and vs: [k, Mv] (which do
    not change): its random generator; for each candidate the SAMPLE_SIZE rows (or columns) drawn with
    probability proportional to |u_i| (or |v_j|), drawn once and used at every step; and what the dual bounds
    take from the candidates alone (``bound_terms``, ``w_all``)."""

    def __init__(self, us: torch.Tensor, vs: torch.Tensor, seed: int) -> None:
        self.vs = vs
        self.gen = torch.Generator(device=us.device)
        self.gen.manual_seed(seed)
        self._weighted: dict = {}
        self._us64, self._vs64 = us.to(torch.float64), vs.to(torch.float64)
        self.w_all = self._us64.abs().sum(0)[:, None] * self._vs64.abs().sum(0)[None, :]
        """[Mu, Mv]: sum_ij |u_i v_j| = ||u||_1 ||v||_1 of every pair."""
        self._bound_terms: dict = {}
        self.favoured: tuple[int, int] | None = None
        """The pair with the lowest dual bound at the last step, other than the one it (likely) picked. At near
        ties a pick changes R little, and this is the next step's best pair, or one of the few next to it, as
        often as the pair its own bounds favour (measured): it is evaluated in the pass of the bounds."""

    def bound_terms(self, alpha: int) -> _BoundTerms:
        if alpha not in self._bound_terms:
            self._bound_terms[alpha] = _BoundTerms.of(self._us64, self._vs64, alpha)
        return self._bound_terms[alpha]

    def weighted(self, side: str, candidates: torch.Tensor, index: int) -> torch.Tensor:
        if (side, index) not in self._weighted:
            self._weighted[side, index] = _weighted_indices(candidates[:, index], SAMPLE_SIZE, self.gen)
        return self._weighted[side, index]

    def all_weighted(self, side: str, candidates: torch.Tensor) -> torch.Tensor:
        """[M, SAMPLE_SIZE]: the draws of every candidate on one side."""
        if (side, "all") not in self._weighted:
            self._weighted[side, "all"] = torch.stack([self.weighted(side, candidates, index)
                                                       for index in range(candidates.shape[1])])
        return self._weighted[side, "all"]


def _brackets(p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, widths: dict,
              state: _FitState) -> dict[tuple[int, int], tuple[float, float]]:
    """For each pair (a, b) in ``widths``, a range likely to hold the weighted median of R/(u v^T): quantiles
    of a sample drawn with probability proportional to |u_i v_j| (rows and columns drawn independently; one
    draw of rows per a and of columns per b serves all pairs), ``widths[pair]`` standard deviations of the
    sample median's rank either side of it. The rows and columns are the fit's draws (``state``), the same at
    every step."""
    n = SAMPLE_SIZE
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
        ends = kernels.sample_brackets(p.contiguous().numpy(), q.contiguous().numpy(), us.contiguous().numpy(),
                                       vs.contiguous().numpy(), rows, cols, table)
        found.update((pair, (float(lo), float(hi))) for pair, (lo, hi) in zip(sampled, ends.tolist(), strict=True))
        return found
    for a, b in sampled:
        i, j = state.weighted("u", us, a), state.weighted("v", vs, b)
        ratios = (p[i] * q[j]).sum(1) / (us[i, a] * vs[j, b])
        found[a, b] = _order_statistics(ratios, *ranks[a, b])
    return found


def _order_statistics(x: torch.Tensor, k_lo: int, k_hi: int) -> tuple[float, float]:
    """The k_lo-th and k_hi-th smallest entries of x (0-based): one partial sort on the CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        found = np.partition(x.numpy(), (k_lo, k_hi))
        return float(found[k_lo]), float(found[k_hi])
    return float(torch.kthvalue(x, k_lo + 1).values), float(torch.kthvalue(x, k_hi + 1).values)


def _weighted_indices(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices into x drawn with replacement, index i with probability |x_i| / sum |x| (by inverting the
    cumulative sum: several times faster than torch.multinomial); x has a nonzero entry."""
    cdf = x.abs().to(torch.float64).cumsum(0)
    draws = torch.rand(n, dtype=torch.float64, generator=gen, device=x.device) * cdf[-1]
    if kernels.available and x.device.type == "cpu":  # the same indices, from a guide table (~10x faster)
        return torch.from_numpy(kernels.inverse_cdf(cdf.numpy(), draws.numpy()))
    return torch.searchsorted(cdf, draws, right=True).clamp_(max=x.numel() - 1)


def _exact_pairs(res: _Residual, us: torch.Tensor, vs: torch.Tensor, pairs: list[tuple[int, int]],
                 state: _FitState, bounds: tuple = (), tangents: _TangentPass | None = None
                 ) -> tuple[dict, tuple | None]:
    """(delta, objective) of each pair over every entry of R, exactly; and, if ``bounds`` names the powers
    alpha to take, every pair's dual lower bound (see ``_lower_bounds``) from the same pass, with the sums
    it came from: (lower bounds [Mu, Mv], _BoundSums); and ``tangents``, if given, summed in the first pass.

    delta is the lower weighted median of R[i,j] / (u_i v_j) with weights |u_i v_j|; the objective is
    sum |R - delta u v^T| over all entries. One pass over R serves all pairs: entries below / above a
    sampled bracket are summed, those inside it are kept and sorted. A bracket that misses the median is
    widened and the pass repeated, so the result never depends on the sample.
    """
    p, q = res.p, res.q
    result: dict[tuple[int, int], tuple[float, float]] = {}
    widths = (*_BRACKET_WIDTHS, math.inf)
    # Small matrices: keeping every entry costs less than drawing the sample.
    first = 0 if p.shape[0] * q.shape[0] > 4 * SAMPLE_SIZE else len(_BRACKET_WIDTHS)
    todo = {pair: first for pair in pairs}  # pair -> index into widths
    bound_sums = _BoundSums(bounds) if bounds else None
    while todo or bound_sums is not None:
        brackets = _brackets(p, q, us, vs, {pair: widths[level] for pair, level in todo.items()}, state)
        passes = {pair: _PairPass(*bracket) for pair, bracket in brackets.items()}
        _accumulate(res, us, vs, passes, bound_sums, tangents)
        tangents = None
        if bound_sums is not None:
            bound_sums.finish(state)
            lower = _lower_bounds_from(bound_sums, p, q, state)
            sums, bound_sums = bound_sums, None
        for pair, acc in passes.items():
            found = _select(acc)
            if found is None:
                todo[pair] += 1
            else:
                result[pair] = found
                del todo[pair]
    return result, ((lower, sums) if bounds else None)


def _exact_pairs_batched(p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor,
                         pairs: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, float]]:
    """The same as ``_exact_pairs`` for a small R, all pairs at once: every ratio of every pair is formed,
    and each pair's weighted median selected (compiled, on the CPU) or found by sorting."""
    r = (p @ q.T).reshape(-1)  # [n], entry t at row t // k, column t % k
    t = torch.arange(r.numel(), device=p.device)
    deltas, objectives = _pair_medians(r, us, vs, t // q.shape[0], t % q.shape[0])
    return {pair: (float(deltas[pair]), float(objectives[pair])) for pair in pairs}


def _pair_medians(r: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's exact fit over the entries r [n] at rows iu and columns iv: ([Mu, Mv] deltas, [Mu, Mv]
    float64 objectives), delta the lower weighted median of r / (u v) with weights |u v| (0 where every
    weight is 0), the products and ratios in r's dtype; one compiled parallel call on the CPU."""
    f64 = torch.float64
    shape = (us.shape[1], vs.shape[1])
    if kernels.available and r.device.type == "cpu":
        deltas, objectives = map(torch.from_numpy, kernels.pair_medians(
            r.numpy(), us.contiguous().numpy(), vs.contiguous().numpy(), iu.numpy(), iv.numpy()))
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
    delta = _weighted_medians(ratio, w)
    objective = (r[None, :].to(f64) - delta.to(f64) * uv.to(f64)).abs().sum(1)
    for k, pair in enumerate(missed):
        deltas[pair], objectives[pair] = float(delta[k, 0]), float(objective[k])
    return deltas, objectives


def _weighted_medians(ratio: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[P, 1]: the lower weighted median of each row of ``ratio`` [P, n] with weights ``w`` [P, n] (0 for a
    row of zero weights): a linear-time selection per row on the CPU, else one sort of all rows."""
    totals = w.sum(1, dtype=torch.float64)
    if kernels.available and ratio.device.type == "cpu":
        deltas = kernels.weighted_select_rows(ratio.numpy().copy(), w.numpy().copy(), (totals / 2).numpy())
        for k, total in enumerate(totals.tolist()):
            if total == 0:
                deltas[k] = 0.0
            elif math.isnan(deltas[k]):  # a total that rounding put a hair above the kernel's own sum
                deltas[k] = _sorted_select(ratio[k], w[k], total / 2)[0]
        return torch.from_numpy(deltas).to(ratio.dtype)[:, None]
    ratio, order = ratio.sort(dim=1, stable=True)
    cum = w.gather(1, order).to(torch.float64).cumsum(1)
    idx = (cum < cum[:, -1:] / 2).sum(1, keepdim=True).clamp(max=ratio.shape[1] - 1)
    return torch.where(cum[:, -1:] > 0, ratio.gather(1, idx), torch.zeros_like(idx, dtype=ratio.dtype))


def _use_kernel(r_chunk: torch.Tensor) -> bool:
    return kernels.available and r_chunk.device.type == "cpu" and r_chunk.numel() >= KERNEL_MIN_ENTRIES


def _accumulate(res: _Residual, us: torch.Tensor, vs: torch.Tensor, passes: dict,
                bound_sums: _BoundSums | None = None, tangents: _TangentPass | None = None) -> None:
    """One pass over R, a chunk of rows at a time, feeding every pair's accumulators (and the dual sums, to be
    finished by the caller, and the tangents, if given)."""
    p = res.p
    f64 = torch.float64
    by_a: dict[int, list[int]] = {}
    for a, b in passes:
        by_a.setdefault(a, []).append(b)
    has_zero_u = {a: bool((us[:, a] == 0).any()) for a in by_a}
    has_zero_v = {b: bool((vs[:, b] == 0).any()) for _, b in passes}
    scratch: dict = {}
    if kernels.available and p.device.type == "cpu":  # contiguous candidate vectors for the kernel
        us_rows, vs_cols = us.T.contiguous().numpy(), vs.T.contiguous().numpy()
    for rows, r_chunk, owed in res.owing_chunks():
        if bound_sums is not None:
            bound_sums.add(r_chunk, vs, owed)  # subtracts what the chunk owes, in the same pass
        elif owed is not None:
            _subtract(r_chunk, *owed)
        if tangents is not None:
            tangents.add(rows, r_chunk)
        if _use_kernel(r_chunk):
            r_np = r_chunk.numpy()
            for (a, b), acc in passes.items():
                acc.add(*kernels.bracket_pass(r_np, us_rows[a, rows], vs_cols[b], acc.lo, acc.hi, scratch))
            continue
        for a, bs in by_a.items():
            u = us[rows, a]
            u_abs = u.abs()
            signed_rows = r_chunk * u.sign()[:, None]
            for b in bs:
                acc = passes[(a, b)]
                v = vs[:, b]
                t = signed_rows * v.sign()[None, :]  # t = w * ratio
                w = u_abs[:, None] * v.abs()[None, :]  # w = |u_i v_j|
                ratio = t / w  # = R / (u_i v_j), bit for bit; NaN where w = 0
                below = ratio < acc.lo
                above = ratio > acc.hi
                inside = ~(below | above) & (w > 0)
                zero = 0.0
                if has_zero_u[a] or has_zero_v[b]:  # entries with u_i v_j = 0 count |R_ij|
                    zero = (r_chunk.abs() * (w == 0)).sum(dtype=f64)
                sums = ((w * below).sum(dtype=f64), (t * below).sum(dtype=f64), (w * above).sum(dtype=f64),
                        (t * above).sum(dtype=f64), zero)
                acc.add(sums, ratio[inside], w[inside])


def _select(acc: _PairPass) -> tuple[float, float] | None:
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
        delta, inside = _sorted_select(ratios, weights, half - acc.w_below)
    objective = (delta * acc.w_below - acc.t_below) + (acc.t_above - delta * acc.w_above) + inside + acc.zero_weight_abs
    return delta, objective


def _sorted_select(ratios: torch.Tensor, weights: torch.Tensor, half: float) -> tuple[float, float]:
    """The first ratio in ascending order whose cumulative weight reaches ``half``, and the sum of
    weight * |ratio - it|."""
    order = torch.argsort(ratios)
    ratios, weights = ratios[order], weights[order].to(torch.float64)
    cum = torch.cumsum(weights, 0)
    idx = int(torch.searchsorted(cum, torch.tensor([half], dtype=cum.dtype, device=cum.device)))
    delta = float(ratios[min(idx, ratios.numel() - 1)])
    return delta, float((weights * (ratios.to(torch.float64) - delta).abs()).sum())


def _lower_bounds(p: torch.Tensor, q: torch.Tensor, us: torch.Tensor, vs: torch.Tensor,
                  powers: tuple = BOUND_POWERS) -> tuple[torch.Tensor, float]:
    """Certified lower bounds on every pair's objective, from one pass over R; returns ([Mu, Mv], ||R||_1).

    By L1 duality, min_delta ||R - delta u v^T||_1 >= <W, R> for any W with |W_ij| <= 1 and <W, u v^T> = 0.
    For a correction direction E with sign(E_ij) = sign(u_i v_j) and max |E_ij| = 1,
    W = sign(R) (1 - |tau| |E|) - tau E is one whenever |tau| <= 1, with tau from <W, u v^T> = 0:
    tau = c1 / (c3 + sign(c1) c2), c1 = <sign(R), u v^T>, c2 = <sign(R) |E|, u v^T>, c3 = <E, u v^T>;
    then bound = ||R||_1 - |tau| <|E|, |R|> - tau <E, R>. E = sign(u v^T) |u|^alpha |v^T|^alpha / norm for
    alpha in BOUND_POWERS (alpha = 0 spreads the correction evenly; larger alpha puts it on the entries
    with large |u_i v_j|, which are the ones whose sign a small delta flips); each pair keeps its best bound.
    """
    sums, state = _BoundSums(powers), _FitState(us, vs, 0)
    _accumulate(_Residual(p, q), us, vs, {}, sums)
    sums.finish(state)
    return _lower_bounds_from(sums, p, q, state), sums.l1


def _lower_bounds_from(sums: _BoundSums, p, q, state: _FitState) -> torch.Tensor:
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
    return best.cpu()


def _sample_objectives(p, q, us, vs, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Every pair's objective estimated on a uniform sample of entries ([Mu, Mv]), and the sample's ||R||_1
    on the same scale. They only decide which pairs are evaluated first, never the result."""
    n = ESTIMATE_SAMPLE
    i = torch.randint(p.shape[0], (n,), generator=gen, device=p.device)
    j = torch.randint(q.shape[0], (n,), generator=gen, device=p.device)
    r = (p[i] * q[j]).sum(1)  # [n], in the compute dtype (estimates need no more)
    objectives = _pair_medians(r, us, vs, i, j)[1]
    return objectives.cpu(), float(r.abs().sum(dtype=torch.float64))


@dataclass(frozen=True)
class _Tangent:
    """f(theta) and a subgradient g(theta) of a pair's objective f(delta) = sum |R - delta u v^T|, with err,
    a bound on the rounding in f (and in g times any distance the envelope spans)."""

    theta: float
    f: float
    g: float
    err: float


def _tangents(res: _Residual, us, vs, pairs: list[tuple[int, int]],
              points: dict[tuple[int, int], tuple[float, ...]]) -> dict[tuple[int, int], list[_Tangent]]:
    """f and a subgradient at each of a pair's points (one or two: the ends of a bracket, or one end), from
    one pass that forms no ratio (see ``_TangentPass``)."""
    probes = _TangentPass(us, vs, pairs, points)
    for rows, r_chunk in res.chunks():
        probes.add(rows, r_chunk)
    return probes.finish()


class _TangentPass:
    """The tangents of some pairs' objectives at given points, summed a chunk of R at a time: by ``_tangents``
    in a pass of their own, or by ``_accumulate`` in the pass of the dual sums.

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
        self.thetas = torch.tensor([[self.probes[m][1], self.probes[n][1]] for m, n in self.doubles],
                                   dtype=f64).to(us.dtype)
        self.sums = torch.zeros(len(self.doubles), 4, dtype=f64, device=us.device)
        self._kernel_args: tuple | None = None  # (u, v, slots, thetas, sum_j v) as the kernel takes them

    def add(self, rows: slice, r_chunk: torch.Tensor) -> None:
        u, v, slots, thetas, sums, f64 = self.u, self.v, self.slots, self.thetas, self.sums, torch.float64
        if _use_kernel(r_chunk):
            if self._kernel_args is None:
                self._kernel_args = (u.numpy(), v.numpy(), slots.numpy(), thetas.numpy(),
                                     v.numpy().sum(axis=1, dtype=np.float64))
            u_np, v_np, slots_np, thetas_np, vsum = self._kernel_args
            sums.numpy()[:] += kernels.tangent_sums(r_chunk.numpy(), u_np, v_np, slots_np, thetas_np, rows.start, vsum)
            return
        for s, (k_p, k_q) in enumerate(slots.tolist()):
            for m, (k, theta) in enumerate(((k_p, thetas[s, 0]), (k_q, thetas[s, 1]))):
                u_k = u[k, rows]
                e = r_chunk - (theta * u_k)[:, None] * v[k][None, :]
                sums[s, 2 * m] += e.abs().sum(dtype=f64)
                sums[s, 2 * m + 1] -= (u_k.to(f64) * (e.sign() * v[k][None, :]).sum(1, dtype=f64)).sum()

    def finish(self) -> dict[tuple[int, int], list[_Tangent]]:
        """Every pair's tangents, once all chunks are in."""
        f64, u, v = torch.float64, self.u, self.v
        sums, thetas = self.sums.cpu().reshape(-1, 2), self.thetas.to(f64).reshape(-1)  # (f, g), theta per probe
        found = {}  # probe -> (theta, f, g)
        for n, m in enumerate(m for double in self.doubles for m in double):
            found.setdefault(m, (float(thetas[n]), float(sums[n, 0]), float(sums[n, 1])))
        # Rounding: each |e| is within 3 eps (|R_ij| + |theta u_i v_j|) of the exact one, and each sum within
        # SUM_BLOCK eps of its terms' magnitudes (the kernel adds runs in the compute dtype; its slope is
        # 2 sum_{e > 0} - sum, twice the error). With W = sum |u_i v_j| = ||u||_1 ||v||_1 and
        # ||R||_1 <= f(theta) + |theta| W, err bounds the error of a tangent's value and of its slope over any
        # distance up to twice the largest |theta|.
        eps = torch.finfo(u.dtype).eps
        w_all = (u.to(f64).abs().sum(1) * v.to(f64).abs().sum(1)).cpu().tolist()
        result: dict[tuple[int, int], list[_Tangent]] = {pair: [] for pair in self.pairs}
        for k, pair in enumerate(self.pairs):
            mine = [found[m] for m, probe in enumerate(self.probes) if probe[0] == k]
            theta_max = max(abs(theta) for theta, _, _ in mine)
            r_abs = min(f + abs(theta) * w_all[k] for theta, f, _ in mine) * (1 + 1e-3)
            err = (kernels.SUM_BLOCK + 4) * eps * (r_abs + 7 * theta_max * w_all[k])
            result[pair] = [_Tangent(theta, f, g, err) for theta, f, g in mine]
        return result


def _envelope_bounds(tangents: list[_Tangent]) -> tuple[float, float, tuple[float, float] | None]:
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
        return -math.inf, upper, None
    left = max(falling, key=lambda t: t.theta)
    right = min(rising, key=lambda t: t.theta)
    if left.theta > right.theta:  # inconsistent by rounding: a slope's sign flipped at a tie
        return -math.inf, upper, None
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
    return lower - 3 * err, upper, (left.theta, right.theta)


def l1_fit(left: torch.Tensor, right: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, steps: int,
           exhaustive: bool = False, seed: int = 0) -> tuple[list[Pick], int, int]:
    """Step 4: greedy L1 rank-1 fitting of dW = left @ right with pairs (us[:, a], vs[:, b]).

    At each of ``steps`` steps every pair's delta (lower weighted median) and objective are those over all
    entries; the smallest objective wins, exact ties to the smallest a, then b; R is deflated by the pick.
    Unless ``exhaustive``, a pair is evaluated only if its certified lower bound does not already exceed
    the best objective found (bounds within a relative 1e-6 of it are evaluated too), which leaves the
    pick unchanged. Returns (picks, pairs evaluated exactly, pairs in all).
    """
    n_u, n_v = us.shape[1], vs.shape[1]
    if n_u == 0 or n_v == 0:
        return [], 0, 0
    state = _FitState(us, vs, seed)
    p, q = left, right.T  # R = p @ q^T, deflated by appending columns (see _Residual.deflate)
    picks: list[Pick] = []
    exact_count = 0
    all_pairs = [(a, b) for a in range(n_u) for b in range(n_v)]
    screen = not exhaustive and p.shape[0] * q.shape[0] >= SCREEN_MIN_ENTRIES
    batched = p.shape[0] * q.shape[0] * len(all_pairs) <= BATCHED_MAX_ENTRIES
    res = _Residual(p, q)
    for _ in range(steps):
        if batched:
            evaluated = _exact_pairs_batched(res.p, res.q, us, vs, all_pairs)
        elif screen:
            evaluated = _screened(res, us, vs, all_pairs, state)
        else:
            evaluated = _exact_pairs(res, us, vs, all_pairs, state)[0]
        exact_count += len(evaluated)
        (a, b), (delta, objective) = _best(res, us, vs, evaluated)
        picks.append(Pick(a + 1, b + 1, delta, objective))
        res = res.deflate(delta, us[:, a], vs[:, b])
    return picks, exact_count, steps * len(all_pairs)


NEAR_TIE = 64
"""Objectives within NEAR_TIE * eps(dtype) (relative) of the best are compared again, summed in one order."""


def _best(res: _Residual, us, vs, evaluated: dict) -> tuple[tuple[int, int], tuple[float, float]]:
    """The pair with the smallest objective (ties to the smallest a, then b) and its (delta, objective).

    An objective's last bits depend on how its pass split the entries around the bracket (an entry
    inside adds weight * |ratio - delta| with the ratio rounded, one outside adds from R itself), and the
    compute-dtype residual's last bits on how the CPU's matrix product rounds. Pairs within NEAR_TIE * eps of
    the best are therefore compared on objectives decided in float64 (``_objectives64``): the same bits on
    every CPU, thread count and chunking, compiled or not, so that the pick never depends on the machine.
    """
    best = min(obj for _, obj in evaluated.values())
    tie = NEAR_TIE * torch.finfo(us.dtype).eps * abs(best)
    near = sorted(pair for pair, (_, obj) in evaluated.items() if obj <= best + tie)
    if len(near) == 1:
        return near[0], evaluated[near[0]]
    summed = _objectives64(res.p, res.q, us, vs, near, [evaluated[pair][0] for pair in near])
    pair = min(near, key=lambda pair: (summed[pair], pair))
    return pair, (evaluated[pair][0], summed[pair])


def _objectives64(p, q, us, vs, pairs: list, deltas: list) -> dict[tuple[int, int], float]:
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
    for rows in _row_chunks(p.shape[0], q.shape[0]):
        if compiled:
            found = kernels.objectives64(p[rows].contiguous().numpy(), q_np, u[:, rows].contiguous().numpy(),
                                         v.numpy(), np.asarray(deltas, np.float64))
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
        terms[:, :q.shape[0]] = (r64 - delta * (u[index].to(f64)[:, None] * v[index].to(f64)[None, :])).abs()
        lanes = torch.zeros(p.shape[0], 8, dtype=f64, device=p.device)
        for start in range(0, width, 8):
            lanes += terms[:, start:start + 8]
        out[index] = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + (
            (lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7]))
    return out


def _screened(res: _Residual, us, vs, pairs, state: _FitState) -> dict[tuple[int, int], tuple[float, float]]:
    """Exact objectives of the pairs that the certified lower bounds cannot rule out.

    1. The pair with the best estimate (on a sample) is evaluated exactly, in a pass that also gives every
       pair's dual bound (``_lower_bounds``) and the first tangents of the next best-estimated pairs
       (``_early_pairs``). At near ties (see NEAR_TIE_GAIN) the estimates cannot tell the pairs apart, but the
       dual bounds can (measured: the pair with the lowest bound is the best pair, or one of the few next to it;
       the estimate's pair often gained nothing, and then no bound ruled out a pair): the pair evaluated with
       the bounds is the one the last step's bounds favour (``_FitState.favoured``); at the first near tie of a
       fit the bounds come first, in a pass of their own, and the pair with the lowest bound is evaluated next.
    2. The pairs whose dual bound does not exceed the best objective so far get tangent bounds and upper
       bounds (``_tangents``, ``_envelope_bounds``) from cheaper passes that form no ratio: first at the
       ends of a bracket sampled with weights |u_i v_j| (``_brackets``), then (up to TANGENT_ROUNDS times)
       in a bracket narrowed around the minimum, as long as that rules out pairs. After the first round
       the pair with the best upper bound is evaluated, if it can beat the best objective.
    3. The pairs left are evaluated.
    Bounds within a relative 1e-6 of the best count as not exceeding it. Estimates and brackets decide
    only the order of the work, never the result.
    """
    p, q = res.p, res.q
    estimates, sample_l1 = _sample_objectives(p, q, us, vs, state.gen)
    best_estimate = float(estimates.min())
    estimated = estimates.tolist()
    first = [min(pairs, key=lambda pair: (estimated[pair[0]][pair[1]], pair))]
    near_tie = sample_l1 - best_estimate < NEAR_TIE_GAIN * sample_l1
    if near_tie and state.favoured in pairs:  # the pair the last step's bounds favour, with the bounds
        brackets, early_pass = {}, None
        evaluated, (bounds, sums) = _exact_pairs(res, us, vs, [state.favoured], state, bounds=BOUND_POWERS)
    elif near_tie:  # the bounds first, in a pass of their own, then the pair they favour
        brackets, early_pass = {}, None
        _, (bounds, sums) = _exact_pairs(res, us, vs, [], state, bounds=BOUND_POWERS)
        lowest = bounds.tolist()
        first = [min(pairs, key=lambda pair: (lowest[pair[0]][pair[1]], pair))]
        evaluated = _exact_pairs(res, us, vs, first, state)[0]
    else:
        early = _early_pairs(estimates, sample_l1, first[0])
        brackets = _brackets(p, q, us, vs, dict.fromkeys(early, BRACKET_Z), state)
        early_pass = _TangentPass(us, vs, early, {pair: _far_end(brackets[pair]) for pair in early}) if early else None
        evaluated, (bounds, sums) = _exact_pairs(res, us, vs, first, state, bounds=BOUND_POWERS[:1],
                                                 tangents=early_pass)

    def best() -> float:
        return min(obj for _, obj in evaluated.values())

    def slack(value: float) -> float:
        return 1e-6 * abs(value) + 1e-300

    ceiling, bound_of = best() + slack(best()), bounds.tolist()
    rest = [pair for pair in pairs if pair not in evaluated and bound_of[pair[0]][pair[1]] <= ceiling]
    brackets.update(_brackets(p, q, us, vs, {pair: BRACKET_Z for pair in rest if pair not in brackets}, state))
    found = early_pass.finish() if early_pass is not None else {}
    tangents: dict[tuple[int, int], list[_Tangent]] = {pair: found.get(pair, []) for pair in rest}

    def with_zero(pair) -> list[_Tangent]:  # the tangent at 0 (free), its rounding over the span of the others
        return [*tangents[pair], _zero_tangent(sums, pair, max((abs(t.theta) for t in tangents[pair]), default=0.0))]

    for round_ in range(TANGENT_ROUNDS):
        if not rest:
            break
        points = {pair: () if round_ == 0 and tangents[pair] else _points(brackets[pair], with_zero(pair)[-1])
                  for pair in rest}  # the early pairs' first tangents came with the dual sums
        probed = [pair for pair in rest if points[pair]]
        for pair, found in (_tangents(res, us, vs, probed, points) if probed else {}).items():
            tangents[pair] += found
        envelopes = {pair: _envelope_bounds(with_zero(pair)) for pair in rest}
        ceiling = min(best(), *(upper for _, upper, _ in envelopes.values()))
        before = len(rest)
        rest = sorted((pair for pair in rest if envelopes[pair][0] <= ceiling + slack(ceiling)),
                      key=lambda pair: envelopes[pair][1])
        if round_ == 0 and rest and envelopes[rest[0]][1] < best():
            evaluated.update(_exact_pairs(res, us, vs, rest[:1], state)[0])
            rest = rest[1:]
        rest = [pair for pair in rest if envelopes[pair][0] <= best() + slack(best())]
        if round_ > 0 and len(rest) > before * (1 - TANGENT_MIN_GAIN):
            break
        brackets = {pair: _narrowed(with_zero(pair), envelopes[pair][2]) for pair in rest}
    if rest:
        evaluated.update(_exact_pairs(res, us, vs, rest, state)[0])
    picked = min(evaluated, key=lambda pair: (evaluated[pair][1], pair))
    state.favoured = min((pair for pair in pairs if pair != picked), default=None,
                         key=lambda pair: (bound_of[pair[0]][pair[1]], pair))
    return evaluated


def _early_pairs(estimates: torch.Tensor, sample_l1: float, first: tuple[int, int]) -> list[tuple[int, int]]:
    """The pairs whose first tangents are taken in the pass of the dual sums, at an end of their sampled
    brackets (``_far_end``), before it is known whether the dual bounds rule them out: at most EARLY_PAIRS,
    each with an estimated gain of at least EARLY_GAIN times the first pair's. (At steps that are not near
    ties, the pairs the dual bounds leave are those of the best estimates: taking their tangents early saves
    a pass.)"""
    gains = (sample_l1 - estimates).tolist()
    floor = EARLY_GAIN * gains[first[0]][first[1]]
    found = sorted((-gain, (a, b)) for a, row in enumerate(gains) for b, gain in enumerate(row)
                   if (a, b) != first and gain >= floor)
    return [pair for _, pair in found[:EARLY_PAIRS]]


def _far_end(bracket: tuple[float, float]) -> tuple[float, ...]:
    """Where an early pair's first tangent is taken: the end of its sampled bracket away from 0. With the tangent
    at 0 (from the dual sums of the same pass) it brackets the minimum from both sides, as the two ends would
    (where the bracket holds it), for one probe instead of two: at steps that are not near ties that rules out
    as many pairs (measured). Both ends when the bracket holds 0."""
    lo, hi = bracket
    return (hi,) if lo > 0 else (lo,) if hi < 0 else (lo, hi)


def _zero_tangent(sums: _BoundSums, pair: tuple[int, int], theta_max: float) -> _Tangent:
    """The tangent of a pair's objective at delta = 0, from the dual sums (no pass of its own): the value
    ||R||_1 and the slope -<sign(R), u v^T> (a subgradient: an entry with R_ij = 0 may take sign 0).
    err bounds the rounding of the sums (see ``_BoundSums.run``) in the value, and in the slope over any
    distance up to 7 theta_max (as ``_tangents``); l1 is summed as finely as the tangent passes sum, so that
    this tangent is as sharp as theirs."""
    a, b = pair
    c1 = float(sums.signed[sums.powers.index(0)][a, b])  # alpha = 0: sign(R) against u v^T itself
    w_all, eps = float(sums.w_all[a, b]), sums.eps
    err = (sums.l1_run + 4) * eps * sums.l1 + (sums.run + 4) * eps * 7 * theta_max * w_all
    return _Tangent(0.0, sums.l1, -c1, err)


def _points(bracket: tuple[float, float], zero: _Tangent) -> tuple[float, ...]:
    """Where to take a pair's tangents in a bracket: both ends; or, when the bracket holds 0, only the end on
    the side where the objective falls from 0 (the tangent at 0 is known), and none where it is flat there."""
    lo, hi = bracket
    if not lo < 0 < hi:
        return lo, hi
    return (hi,) if zero.g < 0 else (lo,) if zero.g > 0 else ()


def _narrowed(tangents: list[_Tangent], known: tuple[float, float] | None) -> tuple[float, float]:
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


def mas_svd(left: torch.Tensor, right: torch.Tensor, components: int | None = None, top_h: int | None = None,
            method: Method = Method.MAS_SVD, exhaustive: bool = False) -> Spectrum:
    """The spectrum and SSI of one LoRA update dW = left @ right (left: [d, q], right: [q, k]).

    ``components`` is M (default min(8, q)), ``top_h`` is h (default M). The L1 fit, the only work on
    d x k entries, runs in the dtype of ``left`` / ``right``; the small-factor work (norms, the three
    SVDs) always runs in float64, where it costs nothing and keeps the candidates accurate.
    """
    rank = left.shape[1]
    m = min(components if components is not None else DEFAULT_COMPONENTS, rank)
    h = top_h if top_h is not None else m
    left64, right64 = left.to(torch.float64), right.to(torch.float64)
    if method is Method.SVD:
        sigma = svd_spectrum(left64, right64)
        return Spectrum(_as_tuple(sigma[:h]), ssi(sigma, h), (), (0, 0), 0, 0)
    us, vs = mas_svd_candidates(left64, right64, m)
    picks, exact, total = l1_fit(left, right, us.to(left.dtype), vs.to(left.dtype), m, exhaustive=exhaustive)
    sigma = fit_spectrum(us, vs, picks)
    if method is Method.MAS_SVD:
        sigma = sigma * magnitude(left64, right64)
    return Spectrum(_as_tuple(sigma[:h]), ssi(sigma, h), tuple(picks), (us.shape[1], vs.shape[1]), exact, total)


def fit_spectrum(us: torch.Tensor, vs: torch.Tensor, picks: list[Pick]) -> torch.Tensor:
    """Step 5: singular values of F = sum_m delta_m u_{a_m} v_{b_m}^T, largest first, via its factors."""
    if not picks:
        return torch.zeros(0, dtype=torch.float64)
    idx_a = torch.tensor([pk.a - 1 for pk in picks], device=us.device)
    idx_b = torch.tensor([pk.b - 1 for pk in picks], device=vs.device)
    deltas = torch.tensor([pk.delta for pk in picks], dtype=us.dtype, device=us.device)
    return svd_spectrum(us[:, idx_a] * deltas[None, :], vs[:, idx_b].T).to(torch.float64).cpu()


def _as_tuple(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in t.to(torch.float64).cpu())
