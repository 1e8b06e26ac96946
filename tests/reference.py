"""A slow, literal, dense float64 implementation of shared/spec/MAS-SVD.md, used only to check the tool.

It forms dW, both normalised matrices, every ratio of every pair and every objective explicitly, with
NumPy, and shares no code with s3lora_cli.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS_N = 1e-8
EPS_S = 1e-6


@dataclass
class Reference:
    sigma: np.ndarray  # S' (or S for spsvd, or singular values of dW for svd), all of them, descending
    ssi: float
    picks: list  # [(a, b, delta, objective)], 1-based
    objectives: list  # per step: the [Mu, Mv] matrix of every pair's objective
    candidates: tuple
    margins: list  # per pick: median_margin of the picked pair


def _rank(s: np.ndarray) -> int:
    """Directions with a singular value below 1e-9 of the largest are null directions (not unique)."""
    if s.size == 0 or s[0] == 0:
        return 0
    return int((s > 1e-9 * s[0]).sum())


def weighted_lower_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    idx = int(np.argmax(cum >= cum[-1] / 2))
    return float(values[order][idx])


def median_margin(values: np.ndarray, weights: np.ndarray) -> float:
    """How far (relative to the total weight) every cumulative weight stays from exactly half; near 0 the
    lower and upper weighted medians swap under rounding, and any minimiser in between is as good."""
    cum = np.cumsum(weights[np.argsort(values, kind="stable")])
    return float(np.min(np.abs(cum - cum[-1] / 2)) / cum[-1])


def reference(
    dW: np.ndarray,
    components: int | None = None,
    top_h: int | None = None,
    method: str = "mas-svd",
    rank: int | None = None,
) -> Reference:
    dW = np.asarray(dW, dtype=np.float64)
    d, k = dW.shape
    r = rank if rank is not None else min(d, k)
    M = min(components if components is not None else 8, r)
    h = top_h if top_h is not None else M
    if method == "svd":
        s = np.linalg.svd(dW, compute_uv=False)[:r]
        return Reference(s, float(s[0] / (s[:h].sum() + EPS_S)), [], [], (0, 0), [])

    # steps 1-2
    Wt = dW / (np.linalg.norm(dW, axis=1) + EPS_N)[:, None]
    Wh = Wt / (np.linalg.norm(Wt, axis=0) + EPS_N)[None, :]
    # step 3
    _, s_t, vt_t = np.linalg.svd(Wt)
    u_h, s_h, _ = np.linalg.svd(Wh)
    Vc = vt_t[: min(M, _rank(s_t))].T
    Uc = u_h[:, : min(M, _rank(s_h))]
    # step 4
    R = dW.copy()
    picks, objectives, margins = [], [], []
    if Uc.shape[1] and Vc.shape[1]:
        for _ in range(M):
            objs = np.zeros((Uc.shape[1], Vc.shape[1]))
            deltas = np.zeros_like(objs)
            for a in range(Uc.shape[1]):
                for b in range(Vc.shape[1]):
                    uv = np.outer(Uc[:, a], Vc[:, b])
                    nz = uv != 0
                    if nz.any():
                        delta = weighted_lower_median(R[nz] / uv[nz], np.abs(uv[nz]))
                    else:
                        delta = 0.0
                    deltas[a, b] = delta
                    objs[a, b] = np.abs(R - delta * uv).sum()
            flat = int(np.argmin(objs))  # first minimum in row-major order: smallest a, then smallest b
            a, b = divmod(flat, objs.shape[1])
            picks.append((a + 1, b + 1, deltas[a, b], objs[a, b]))
            uv = np.outer(Uc[:, a], Vc[:, b])
            nz = uv != 0
            margins.append(median_margin(R[nz] / uv[nz], np.abs(uv[nz])) if nz.any() else 1.0)
            objectives.append(objs)
            R = R - deltas[a, b] * np.outer(Uc[:, a], Vc[:, b])
    # step 5
    F = np.zeros_like(dW)
    for a, b, delta, _ in picks:
        F += delta * np.outer(Uc[:, a - 1], Vc[:, b - 1])
    S = np.linalg.svd(F, compute_uv=False)[:M]
    if method == "mas-svd":  # step 6
        S = S * np.linalg.norm(dW, axis=1).mean() * np.linalg.norm(dW, axis=0).mean()
    ssi = float(S[0] / (S[:h].sum() + EPS_S)) if S.size else 0.0
    return Reference(S, ssi, picks, objectives, (Uc.shape[1], Vc.shape[1]), margins)
