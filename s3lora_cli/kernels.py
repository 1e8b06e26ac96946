"""The CPU kernels of the L1 fit, compiled with numba: the exact pass, the tangent and dual-bound sums, and
the weighted selection; each one fused loop instead of a dozen tensor ops.

``available`` is False where numba cannot be imported; callers then use the tensor implementation in
``spectral``, which computes the same values (the ratio of every entry bit for bit; the sums to within
their stated rounding).
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
    zero_t = r.dtype.type(0)
    nan = r.dtype.type(np.nan)
    for i in numba.prange(c):
        ui = u[i]
        row_ratios = np.empty(k, r.dtype)
        w_below = 0.0
        t_below = 0.0
        w_above = 0.0
        t_above = 0.0
        zero = 0.0
        for j in range(k):  # selects, no branches, so that it vectorises
            x = r[i, j]
            uv = ui * v[j]
            ratio = x / uv
            w = abs(uv)
            t = x if uv > zero_t else (-x if uv < zero_t else zero_t)
            below = ratio < lo
            above = ratio > hi
            w_below += np.float64(w if below else zero_t)
            t_below += np.float64(t if below else zero_t)
            w_above += np.float64(w if above else zero_t)
            t_above += np.float64(t if above else zero_t)
            zero += np.float64(abs(x) if uv == zero_t else zero_t)
            row_ratios[j] = ratio if (ratio >= lo) & (ratio <= hi) & (uv != zero_t) else nan  # NaN: not kept
        n = 0
        for j in range(k):  # one branch, taken for the few entries inside: well predicted
            ratio = row_ratios[j]
            if ratio == ratio:
                ratios[i, n] = ratio
                weights[i, n] = abs(ui * v[j])
                n += 1
        sums[i, 0] = w_below
        sums[i, 1] = t_below
        sums[i, 2] = w_above
        sums[i, 3] = t_above
        sums[i, 4] = zero
        counts[i] = n


def _weighted_select(ratios, weights, half):  # pragma: no cover - compiled
    """The smallest ratio whose cumulative weight (in ascending ratio order) reaches ``half``, and the sum
    of weight * |ratio - it| over all entries; (nan, 0) if the total weight is below ``half``.

    Quickselect on (ratio, weight) pairs, expected linear time; equal ratios are interchangeable, so no
    order among them is needed. ``ratios`` and ``weights`` are permuted in place.
    """
    n = ratios.shape[0]
    lo = 0
    hi = n  # the answer is in [lo, hi); weight of entries before lo (all smaller) is below_w
    below_w = 0.0
    seed = 12345
    while hi - lo > 0:
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        pivot = ratios[lo + seed % (hi - lo)]
        # three-way partition of [lo, hi) around pivot: < pivot | == pivot | > pivot
        lt = lo
        gt = hi
        i = lo
        while i < gt:
            x = ratios[i]
            if x < pivot:
                ratios[lt], ratios[i] = ratios[i], ratios[lt]
                weights[lt], weights[i] = weights[i], weights[lt]
                lt += 1
                i += 1
            elif x > pivot:
                gt -= 1
                ratios[gt], ratios[i] = ratios[i], ratios[gt]
                weights[gt], weights[i] = weights[i], weights[gt]
            else:
                i += 1
        w_less = 0.0
        for m in range(lo, lt):
            w_less += weights[m]
        w_equal = 0.0
        for m in range(lt, gt):
            w_equal += weights[m]
        if below_w + w_less >= half:
            hi = lt
        elif below_w + w_less + w_equal >= half:
            delta = pivot
            total = 0.0
            for m in range(n):
                total += np.float64(weights[m]) * abs(np.float64(ratios[m]) - np.float64(delta))
            return np.float64(delta), total
        else:
            below_w += w_less + w_equal
            lo = gt
    return np.nan, 0.0


def _weighted_select_rows(ratios, weights, halves, out):  # pragma: no cover - compiled
    """``_weighted_select`` on every row of ratios / weights [P, n] (each row with its own half), in parallel;
    out[p] = the row's median (nan where the row's weights add up to less than its half)."""
    for row in numba.prange(ratios.shape[0]):
        out[row] = _weighted_select(ratios[row], weights[row], halves[row])[0]


SUM_BLOCK = 64
"""``_tangent_sums`` adds up runs of this many entries in the residual's dtype (fast, vectorised) before adding
them to float64 totals: each total is off by at most SUM_BLOCK * eps(dtype) times the sum of its terms'
magnitudes (``spectral._tangents`` widens its bounds by that much)."""


def _tangent_sums(r, u, v, lo, hi, vsum, out):  # pragma: no cover - compiled
    """Every pair's objective and a subgradient at two points, over one residual chunk, with no division.

    r: [c, k] residual rows; u: [P, c] and v: [P, k], pair p's candidate entries; lo, hi: [P] in r's dtype.
    vsum: [P], sum_j v[p, j] in float64.
    out: [P, c, 4], per pair and row, with e = r - theta u_i v_j for theta = lo, then hi:
    sum_j |e| and -u_i sum_j v_j s_j with s_j = sign(e) (the derivative of sum_j |e| in theta, where no e
    is zero; at e = 0 either sign gives a subgradient, and s_j = -1 is taken), computed as
    -u_i (2 sum_{e > 0} v_j - vsum). Entries with u_i v_j = 0 have e = r exactly and add nothing to the
    second sum.
    """
    c, k = r.shape
    n_pairs = u.shape[0]
    zero_t = r.dtype.type(0)
    for i in numba.prange(c):
        row = r[i]
        for p in range(n_pairs):
            ui = u[p, i]
            v_p = v[p]
            a_lo = lo[p] * ui
            a_hi = hi[p] * ui
            f_lo = 0.0
            f_hi = 0.0
            s_lo = 0.0
            s_hi = 0.0
            for start in range(0, k, SUM_BLOCK):
                run_f_lo = zero_t
                run_f_hi = zero_t
                run_s_lo = zero_t
                run_s_hi = zero_t
                for j in range(start, min(k, start + SUM_BLOCK)):
                    x = row[j]
                    vj = v_p[j]
                    e_lo = x - a_lo * vj
                    e_hi = x - a_hi * vj
                    run_f_lo += abs(e_lo)
                    run_f_hi += abs(e_hi)
                    run_s_lo += vj if e_lo > zero_t else zero_t  # a select: branch-free
                    run_s_hi += vj if e_hi > zero_t else zero_t
                f_lo += run_f_lo
                f_hi += run_f_hi
                s_lo += run_s_lo
                s_hi += run_s_hi
            out[p, i, 0] = f_lo
            out[p, i, 1] = -np.float64(ui) * (2 * s_lo - vsum[p])
            out[p, i, 2] = f_hi
            out[p, i, 3] = -np.float64(ui) * (2 * s_hi - vsum[p])


DUAL_ROWS = 4
"""``_dual_sums`` takes this many rows at a time, so that each load of a candidate vector serves all of them."""

DUAL_RUN = 512
"""``_dual_sums`` adds up runs of this many products in the residual's dtype before adding them to float64."""


def _dual_sums(r, v_signed, v_abs, signed_out, abs_out, l1_out):  # pragma: no cover - compiled
    """The projections of sign(R) and |R| that the dual lower bounds need, over one residual chunk.

    r: [c, k]; v_signed: [n1, k] and v_abs: [n2, k] in r's dtype. Writes, per row i,
    signed_out[i, m] = sum_j sign(r_ij) v_signed[m, j], abs_out[i, m] = sum_j |r_ij| v_abs[m, j] and
    l1_out[i] = sum_j |r_ij| (float64, from runs of DUAL_RUN terms added in r's dtype).
    """
    c, k = r.shape
    n1 = v_signed.shape[0]
    n2 = v_abs.shape[0]
    zero_t = r.dtype.type(0)
    one_t = r.dtype.type(1)
    for group in numba.prange((c + DUAL_ROWS - 1) // DUAL_ROWS):
        first = group * DUAL_ROWS
        n_rows = min(DUAL_ROWS, c - first)
        signs = np.zeros((DUAL_ROWS, k), r.dtype)  # rows past the chunk's end stay zero
        mags = np.zeros((DUAL_ROWS, k), r.dtype)
        for t in range(n_rows):
            total = 0.0
            for start in range(0, k, DUAL_RUN):
                run = zero_t
                for j in range(start, min(k, start + DUAL_RUN)):
                    x = r[first + t, j]
                    signs[t, j] = one_t if x > zero_t else (-one_t if x < zero_t else zero_t)
                    mags[t, j] = abs(x)
                    run += abs(x)
                total += np.float64(run)
            l1_out[first + t] = total
        for m in range(n1 + n2):
            rows = signs if m < n1 else mags
            v = v_signed[m] if m < n1 else v_abs[m - n1]
            x0, x1, x2, x3 = rows[0], rows[1], rows[2], rows[3]
            c0 = 0.0
            c1 = 0.0
            c2 = 0.0
            c3 = 0.0
            for start in range(0, k, DUAL_RUN):
                e0 = zero_t
                e1 = zero_t
                e2 = zero_t
                e3 = zero_t
                for j in range(start, min(k, start + DUAL_RUN)):
                    vj = v[j]
                    e0 += x0[j] * vj
                    e1 += x1[j] * vj
                    e2 += x2[j] * vj
                    e3 += x3[j] * vj
                c0 += np.float64(e0)
                c1 += np.float64(e1)
                c2 += np.float64(e2)
                c3 += np.float64(e3)
            out = signed_out if m < n1 else abs_out
            col = m if m < n1 else m - n1
            for t, value in enumerate((c0, c1, c2, c3)):
                if t < n_rows:
                    out[first + t, col] = value


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
    _weighted_select = numba.njit(cache=True, nogil=True)(_weighted_select)
    _weighted_select_rows = numba.njit(parallel=True, cache=True, nogil=True)(_weighted_select_rows)
    _tangent_sums = numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy",
                               fastmath={"reassoc"})(_tangent_sums)
    _dual_sums = numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy",
                            fastmath={"reassoc"})(_dual_sums)


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


def tangent_sums(r: np.ndarray, u: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Run ``_tangent_sums`` on one chunk; returns [P, 4] float64 (the per-row sums added up)."""
    out = np.empty((u.shape[0], r.shape[0], 4), np.float64)
    _tangent_sums(r, u, v, lo.astype(r.dtype), hi.astype(r.dtype), v.sum(axis=1, dtype=np.float64), out)
    return out.sum(axis=1)


def weighted_select_rows(ratios: np.ndarray, weights: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """``weighted_select`` on every row of ``ratios`` / ``weights`` [P, n] (reordered in place); [P] float64."""
    out = np.empty(ratios.shape[0])
    _weighted_select_rows(ratios, weights, halves, out)
    return out


def dual_sums(r: np.ndarray, v_signed: np.ndarray, v_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``_dual_sums`` on one chunk; returns (signed [c, n1], absolute [c, n2], l1 [c]), all float64."""
    c = r.shape[0]
    signed, absolute, l1 = np.empty((c, v_signed.shape[0])), np.empty((c, v_abs.shape[0])), np.empty(c)
    _dual_sums(r, v_signed, v_abs, signed, absolute, l1)
    return signed, absolute, l1


def weighted_select(ratios: np.ndarray, weights: np.ndarray, half: float) -> tuple[float, float]:
    """The lower weighted median of ``ratios`` once ``half`` of the total weight is known, and the sum of
    weight * |ratio - median| over them (see ``_weighted_select``); the arrays are reordered in place."""
    delta, spread = _weighted_select(ratios, weights, half)
    return float(delta), float(spread)


def set_threads(n: int) -> None:
    if available:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
