"""The CPU kernel of the exact L1 pass, compiled with numba: one fused loop instead of a dozen tensor ops.

``available`` is False where numba cannot be imported; callers then use the tensor implementation in
``spectral``, which computes the same values (the ratio of every entry bit for bit).
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised where numba is installed (it is a dependency), and by a test without it
    import numba

    available = True
except Exception:  # an unsupported platform or Python: fall back to the tensor implementation
    numba = None
    available = False


def _bracket_pass(r, u, v, lo, hi, sums, counts, ratios, weights):  # pragma: no cover - compiled
    """One residual chunk against one candidate pair.

    r: [c, k] residual rows; u: [c] (the candidate's entries for these rows); v: [k].
    For each row i, writes sums[i] = (weight below lo, signed residual below lo, weight above hi, signed
    residual above hi, |r| where u_i v_j = 0), and the ratios r_ij / (u_i v_j) in [lo, hi] with their
    weights |u_i v_j| to ratios[i, :n], weights[i, :n], n = counts[i]. The signed residual is
    r_ij * sign(u_i v_j) = weight * ratio. Entries with u_i v_j = 0 have weight 0 and sign 0, so they add
    nothing to the four sums whatever their (infinite or NaN) ratio.
    """
    c, k = r.shape
    for i in numba.prange(c):
        ui = u[i]
        row_ratios = np.empty(k, r.dtype)
        w_below = 0.0
        t_below = 0.0
        w_above = 0.0
        t_above = 0.0
        zero = 0.0
        for j in range(k):  # branch-free, so that it vectorises
            x = r[i, j]
            uv = ui * v[j]
            ratio = x / uv
            row_ratios[j] = ratio
            w = np.float64(abs(uv))
            t = np.float64(x) * ((uv > 0) - (uv < 0))
            below = ratio < lo
            above = ratio > hi
            w_below += w * below
            t_below += t * below
            w_above += w * above
            t_above += t * above
            zero += abs(np.float64(x)) * (uv == 0)
        n = 0
        if ui != 0:
            for j in range(k):  # branch-free compaction: always write, advance only past kept entries
                ratio = row_ratios[j]
                ratios[i, n] = ratio
                weights[i, n] = abs(ui * v[j])
                n += (ratio >= lo) & (ratio <= hi) & (v[j] != 0)
        sums[i, 0] = w_below
        sums[i, 1] = t_below
        sums[i, 2] = w_above
        sums[i, 3] = t_above
        sums[i, 4] = zero
        counts[i] = n


def _compact(ratios, weights, counts, out_ratios, out_weights):  # pragma: no cover - compiled
    pos = 0
    for i in range(counts.shape[0]):
        for j in range(counts[i]):
            out_ratios[pos] = ratios[i, j]
            out_weights[pos] = weights[i, j]
            pos += 1


if available:
    # fastmath 'reassoc' only: the float64 sums may be reordered; the ratios stay exact IEEE quotients.
    # error_model="numpy": IEEE division (no zero-division check), which lets the first loop vectorise
    _bracket_pass = numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy",
                               fastmath={"reassoc"})(_bracket_pass)
    _compact = numba.njit(cache=True, nogil=True)(_compact)


def bracket_pass(r: np.ndarray, u: np.ndarray, v: np.ndarray, lo: float, hi: float,
                 scratch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the kernel on one chunk; returns (sums [5] float64, inside ratios [n], their weights [n]) with the
    ratios and weights in the dtype of ``r``.

    ``scratch`` caches the [c, k] buffers between calls with the same chunk shape.
    """
    key = r.shape
    if scratch.get("shape") != key:
        scratch.update(shape=key, ratios=np.empty(key, r.dtype), weights=np.empty(key, r.dtype),
                       sums=np.empty((key[0], 5), np.float64), counts=np.empty(key[0], np.int64))
    sums, counts = scratch["sums"], scratch["counts"]
    _bracket_pass(r, u, v, lo, hi, sums, counts, scratch["ratios"], scratch["weights"])
    n = int(counts.sum())
    out_ratios, out_weights = np.empty(n, r.dtype), np.empty(n, r.dtype)
    _compact(scratch["ratios"], scratch["weights"], counts, out_ratios, out_weights)
    return sums.sum(axis=0), out_ratios, out_weights


def set_threads(n: int) -> None:
    if available:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
