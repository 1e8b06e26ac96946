"""The spec's constants and methods, SSI, and the plain spectrum of one LoRA update, in NumPy (no PyTorch).

Here: the constants of the spec, the method names, a pick and a spectrum as the engine returns them, SSI (paper
Eq. 4) and the singular values of dW = left @ right from its factors, which are the whole of the ``svd`` ablation.
MAS-SVD and ``spsvd`` (the L1 fit, in PyTorch) are the ``engine`` package (``engine.mas_svd``), whose docstring
describes the computation; it takes these names from here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

EPS_NORM = 1e-8
"""eps_n: added to every row and column norm before dividing (paper Eq. 1-2)."""

EPS_SSI = 1e-6
"""eps_s: added to the denominator of SSI (paper Eq. 4)."""

DEFAULT_COMPONENTS = 8
"""M defaults to min(8, r) for a layer of rank r; h defaults to M."""

RANK_RTOL = 1e-10
"""A singular value below RANK_RTOL times the largest (of the float64 small-factor SVD) counts as zero:
well above the rounding noise of a rank-deficient product of factors, far below any real direction."""


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


def ssi(sigma: Sequence[float] | np.ndarray, top_h: int) -> float:
    """SSI = sigma_1 / (sigma_1 + ... + sigma_h + eps_s) (paper Eq. 4); sigma sorted descending."""
    s = np.asarray(sigma, dtype=np.float64)[:top_h]
    if s.size == 0:
        return 0.0
    return float(s[0] / (s.sum() + EPS_SSI))


def svd_spectrum(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Singular values of X = left @ right (left: [d, q], right: [q, k]), largest first, in float64, without
    forming X: the R factors of QR decompositions of left and right^T, then the q x q SVD of their product."""
    r_left = _r_factor(np.asarray(left, dtype=np.float64))
    r_right = _r_factor(np.asarray(right, dtype=np.float64).T)
    return cast(np.ndarray, np.linalg.svd(r_left @ r_right.T, compute_uv=False))


def _r_factor(x: np.ndarray) -> np.ndarray:
    """R of the reduced QR decomposition of x (Q is not formed)."""
    return cast(np.ndarray, np.linalg.qr(x, mode="r"))


def svd_ablation(left: np.ndarray, right: np.ndarray, top_h: int) -> Spectrum:
    """The ``svd`` method: SSI of dW's own top-h singular values (paper Table 5)."""
    sigma = svd_spectrum(left, right)
    return Spectrum(tuple(float(x) for x in sigma[:top_h]), ssi(sigma, top_h), (), (0, 0), 0, 0)


__all__ = [
    "DEFAULT_COMPONENTS",
    "EPS_NORM",
    "EPS_SSI",
    "RANK_RTOL",
    "Method",
    "Pick",
    "Spectrum",
    "ssi",
    "svd_ablation",
    "svd_spectrum",
]
