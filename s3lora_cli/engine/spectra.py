"""The spectra and SSI of one LoRA update (spec steps 1-3, 5, 6): the public entry of the engine.

Everything here works on the low-rank factors of the update, dW = left @ right with left: [d, q] and right:
[q, k] (q is small): the norms and the three SVDs take QR factorisations of the factors and q x q SVDs, in
float64, and never form a d x k matrix. Step 4, the greedy L1 fit, is ``fit.l1_fit``. The spec's constants,
SSI and the ``svd`` ablation are in ``s3lora_cli.spectral``, in NumPy, so that ``svd`` needs no PyTorch; the
fit's factorisations stay in PyTorch, so that a process that fits uses one LAPACK (and its buffers). Equation
numbers refer to the paper; step numbers to ``shared/spec/MAS-SVD.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from s3lora_cli.engine.fit import l1_fit
from s3lora_cli.engine.rounding import Rounding
from s3lora_cli.spectral import DEFAULT_COMPONENTS, EPS_NORM, RANK_RTOL, Method, Pick, Spectrum, ssi, svd_ablation


def mas_svd(
    left: torch.Tensor,
    right: torch.Tensor,
    components: int | None = None,
    top_h: int | None = None,
    method: Method = Method.MAS_SVD,
    exhaustive: bool = False,
) -> Spectrum:
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
        return svd_ablation(left64.cpu().numpy(), right64.cpu().numpy(), h)
    us, vs = mas_svd_candidates(left64, right64, m)
    picks, exact, total = l1_fit(left, right, us.to(left.dtype), vs.to(left.dtype), m, exhaustive=exhaustive)
    sigma = fit_spectrum(us, vs, picks)
    if method is Method.MAS_SVD:
        sigma = sigma * magnitude(left64, right64)
    return Spectrum(_as_tuple(sigma[:h]), ssi(sigma, h), tuple(picks), (us.shape[1], vs.shape[1]), exact, total)


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


def fit_spectrum(us: torch.Tensor, vs: torch.Tensor, picks: list[Pick]) -> np.ndarray:
    """Step 5: singular values of F = sum_m delta_m u_{a_m} v_{b_m}^T, largest first, via its factors (in
    PyTorch's LAPACK, as the candidates: a process that fits loads no second one)."""
    if not picks:
        return np.zeros(0)
    idx_a = torch.tensor([pk.a - 1 for pk in picks], device=us.device)
    idx_b = torch.tensor([pk.b - 1 for pk in picks], device=vs.device)
    deltas = torch.tensor([pk.delta for pk in picks], dtype=us.dtype, device=us.device)
    sigma = lowrank_svd(us[:, idx_a] * deltas[None, :], vs[:, idx_b].T)[1]
    return sigma.to(torch.float64).cpu().numpy()


def magnitude(left: torch.Tensor, right: torch.Tensor) -> float:
    """Step 6: rbar * cbar, the mean row norm times the mean column norm of dW itself (paper Eq. 3)."""
    return float(row_norms(left, right).mean(dtype=torch.float64) * col_norms(left, right).mean(dtype=torch.float64))


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
    """Norms of rows of factor @ core^T below their rounding (``Rounding.of_product`` over the core's columns,
    scaled by ||core||_2 and the factor row's norm) set to 0."""
    scale = float(torch.linalg.matrix_norm(core, ord=2)) if core.numel() else 0.0
    floor = Rounding(torch.finfo(norms.dtype).eps).of_product(max(core.shape[-1], 1), scale) * factor_norms
    return torch.where(norms > floor, norms, torch.zeros_like(norms))


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > float(s[0]) * RANK_RTOL).sum())


def _as_tuple(sigma: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in sigma)
