"""The CPU kernels of the L1 fit, compiled with numba: the exact pass, the tangent and dual-bound sums, the
weighted selection, and the whole step of a small layer; each one fused loop instead of a dozen tensor ops.

``available`` is False where numba cannot be imported; callers then use the tensor implementation in
the engine's other modules, which computes the same values (the ratio of every entry bit for bit; the sums to within
their stated rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # pragma: no cover - exercised where numba is installed (it is a dependency), and by a test without it
    import numba

    available = True
except Exception:  # an unsupported platform or Python: fall back to the tensor implementation
    numba = None  # type: ignore[assignment]
    available = False


def _bracket_pass(r, u, v, v_min, lo, hi, sums, counts, ratios, weights):  # pragma: no cover - compiled
    """One residual chunk against one candidate pair.

    r: [c, k] residual rows; u: [c] (the candidate's entries for these rows); v: [k].
    For each row i, writes sums[i] = (weight below lo, signed residual below lo, weight above hi, signed
    residual above hi, |r| where u_i v_j = 0), and the ratios r_ij / (u_i v_j) in [lo, hi] with their
    weights |u_i v_j| to ratios[i, :n], weights[i, :n], n = counts[i]. The signed residual is
    r_ij * sign(u_i v_j) = weight * ratio. Entries with u_i v_j = 0 have weight 0 and sign 0, so they add
    nothing to the four sums whatever their (infinite or NaN) ratio. v_min: min_j |v_j| (in r's dtype).
    """
    c, k = r.shape
    zero_t = r.dtype.type(0)
    nan = r.dtype.type(np.nan)
    for i in numba.prange(c):
        ui = u[i]
        # some u_i v_j of the row is 0 (a zero, or a product that underflows) only if |u_i| v_min is: for the other
        # rows LLVM makes a loop without the test (7 % faster)
        has_zero = abs(ui) * v_min == zero_t
        row_ratios = ratios[i]  # compacted in place below: the entry read (j) is never before the one written (n)
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
            if has_zero:
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


SELECT_SMALL = 32
"""``_weighted_median`` sorts the candidates left once there are at most this many."""

SELECT_SAMPLE = 256
"""``_weighted_median`` places its two pivots from a sample of sqrt(m) / 2 + 8 of the m candidates left, at most
this many: sorting the sample is the branchy part of a round (its mispredictions cost more than the passes over
a few thousand entries), so a small set takes a small sample and a few more rounds (measured: 2.4x faster on
4,096 entries than one entry in eight, and as fast from 65,536 entries up)."""

SELECT_Z = 2.5
"""The pivots lie this many standard errors of the sample's weight fraction either side of the target."""


def _weighted_select(ratios, weights, half):  # pragma: no cover - compiled
    """The smallest ratio whose cumulative weight (in ascending ratio order) reaches ``half`` (``_weighted_median``),
    and the sum of weight * |ratio - it| over all entries; (nan, 0) if the total weight is below ``half``."""
    delta = _weighted_median(ratios, weights, half)
    if np.isnan(delta):
        return np.nan, 0.0
    total = 0.0
    for j in range(ratios.shape[0]):
        total += np.float64(weights[j]) * abs(np.float64(ratios[j]) - delta)
    return delta, total


def _weighted_median(ratios, weights, half):  # pragma: no cover - compiled
    """The smallest ratio whose cumulative weight (in ascending ratio order) reaches ``half``; nan if the total
    weight is below ``half``.

    Each round places two pivots around the answer from a sorted sample; one pass adds up the weight below,
    between and above them, and a second copies aside the part that holds the answer (the entries between
    the pivots, or the side beyond one that missed): the candidates left. The last few are sorted. Equal
    ratios are interchangeable, so no order among them is needed. The inputs are left as they are.
    """
    n = ratios.shape[0]
    f64 = np.float64
    cur_x = ratios
    cur_w = weights
    m = n
    below_w = 0.0  # weight of the entries known to be smaller than every candidate left
    left_w = 0.0  # weight of the candidates left
    for j in range(n):
        left_w += f64(weights[j])
    out_x = np.empty(n, ratios.dtype)  # the candidates left, after the first round (compacted in place)
    out_w = np.empty(n, weights.dtype)
    seed = 12345
    delta = np.nan
    if half <= 0 and n > 0:  # the first entry in ascending order reaches it
        delta = f64(np.min(ratios))
        m = 0
    while m > SELECT_SMALL and np.isnan(delta):
        lo_pivot, hi_pivot, seed = _pivots(cur_x[:m], cur_w[:m], (half - below_w) / left_w if left_w > 0 else 0.5, seed)
        lo_t = ratios.dtype.type(lo_pivot)  # exact: the pivots are entries (or infinite)
        hi_t = ratios.dtype.type(hi_pivot)
        w_less = 0.0
        w_mid = 0.0
        w_more = 0.0
        for j in range(m):  # vectorised: selects only
            x = cur_x[j]
            w = f64(cur_w[j])
            w_less += w if x < lo_t else 0.0
            w_mid += w if (x >= lo_t) & (x <= hi_t) else 0.0
            w_more += w if x > hi_t else 0.0
        if below_w + w_less >= half:
            part = 0  # the pivots missed high: the answer is below lo_t
            left_w = w_less
        elif below_w + w_less + w_mid >= half:
            part = 1
            below_w += w_less
            left_w = w_mid
            if lo_t == hi_t:  # every candidate between the pivots is equal to them: that is the answer
                delta = f64(lo_t)
                break
        else:
            part = 2  # the pivots missed low
            below_w += w_less + w_mid
            left_w = w_more
        k = 0
        for j in range(m):  # branch-free: every entry is written (at k <= j), the count advances for those kept
            x = cur_x[j]
            out_x[k] = x
            out_w[k] = cur_w[j]
            k += (x < lo_t) if part == 0 else (((x >= lo_t) & (x <= hi_t)) if part == 1 else (x > hi_t))
        if k == 0:  # NaN entries only, or a half above the weights' own sum: no answer here
            return np.nan
        if k == m:  # no progress (many equal entries): finish by sorting
            break
        cur_x = out_x[:k]
        cur_w = out_w[:k]
        m = k
    if np.isnan(delta):
        last_x = cur_x[:m].copy()
        last_w = cur_w[:m].copy()
        _sort_pairs(last_x, last_w, m)
        run = below_w
        for t in range(m):
            run += f64(last_w[t])
            if run >= half:
                delta = f64(last_x[t])
                break
    return delta


def _entries_fit(r, ratios, weights, uvs, total):  # pragma: no cover - compiled
    """One pair's exact fit over entries r [n] with products uvs = u_i v_j [n], their ratios r / uv (inf where uv = 0:
    last in order, of no weight) and weights |uv| [n] of float64 sum ``total``: (delta, objective), delta the lower
    weighted median of the ratios (0 if every weight is 0) and objective = sum |r - delta uv| in float64, as
    ``_pair_medians`` computes them. Where rounding leaves ``total`` a hair above the selection's own sum, the
    median is found by sorting, against the sorted weights' own sum."""
    n = r.shape[0]
    delta = 0.0
    if total > 0:
        delta = _weighted_median(ratios, weights, total / 2)
        if np.isnan(delta):
            sorted_x = ratios.copy()
            sorted_w = weights.copy()
            _sort_pairs(sorted_x, sorted_w, n)
            cum = np.empty(n)
            run = 0.0
            for t in range(n):
                run += np.float64(sorted_w[t])
                cum[t] = run
            for t in range(n):
                if cum[t] >= run / 2:
                    delta = np.float64(sorted_x[t])
                    break
    objective = 0.0
    for t in range(n):
        objective += abs(np.float64(r[t]) - delta * np.float64(uvs[t]))
    return delta, objective


def _pivots(x, w, target, seed):  # pragma: no cover - compiled
    """Two entries of x expected either side of the point where the cumulative weight (ascending) is the
    fraction ``target`` of the total: from a sorted sample of one random entry per equal stride, SELECT_Z
    standard errors of the sample's fraction away (or -inf / inf where the sample ends first)."""
    m = x.shape[0]
    s = min(SELECT_SAMPLE, int(np.sqrt(m)) // 2 + 8, m)
    sample_x = np.empty(s, x.dtype)
    sample_w = np.empty(s, np.float64)
    for t in range(s):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        pos = (t * m) // s + seed % max(1, m // s)
        sample_x[t] = x[pos]
        sample_w[t] = w[pos]
    _sort_pairs(sample_x, sample_w, s)
    sample_total = 0.0
    for t in range(s):
        sample_total += sample_w[t]
    margin = SELECT_Z * np.sqrt(max(target * (1 - target), 0.02) / s) + 1.0 / s
    lo_pivot = -np.inf
    hi_pivot = np.inf
    run = 0.0
    for t in range(s):
        run += sample_w[t]
        fraction = run / sample_total if sample_total > 0 else (t + 1.0) / s
        if fraction < target - margin:
            lo_pivot = np.float64(sample_x[t])
        if fraction >= target + margin and hi_pivot == np.inf:
            hi_pivot = np.float64(sample_x[t])
    return lo_pivot, hi_pivot, seed


def _sort_pairs(x, w, n):  # pragma: no cover - compiled
    """Sort x[:n] ascending in place, w[:n] along with it: a shell sort (Ciura's gaps, extended), small to compile
    and quick on the few hundred entries it is given (NaN, compared false, stays where it falls)."""
    for gap in (100894, 44842, 19930, 8858, 3937, 1750, 701, 301, 132, 57, 23, 10, 4, 1):
        for i in range(gap, n):
            x_i = x[i]
            w_i = w[i]
            j = i
            while j >= gap and x[j - gap] > x_i:
                x[j] = x[j - gap]
                w[j] = w[j - gap]
                j -= gap
            x[j] = x_i
            w[j] = w_i


def _weighted_select_rows(ratios, weights, halves, out):  # pragma: no cover - compiled
    """``_weighted_select`` on every row of ratios / weights [P, n] (each row with its own half), in parallel;
    out[p] = the row's median (nan where the row's weights add up to less than its half)."""
    for row in numba.prange(ratios.shape[0]):
        out[row] = _weighted_select(ratios[row], weights[row], halves[row])[0]


SUM_BLOCK = 64
"""``_tangent_sums`` adds up runs of this many entries in the residual's dtype (fast, vectorised) before adding
them to float64 totals: each total is off by at most SUM_BLOCK * eps(dtype) times the sum of its terms'
magnitudes (``tangents.TangentPass`` widens its bounds by that much)."""


def _tangent_sums(r, u, first_row, v, slots, thetas, vsum, out):  # pragma: no cover - compiled
    """Objectives and subgradients at given points (probes), two probes at a time, with no division.

    r: [c, k] residual rows first_row, first_row + 1, ...; u: [P, d] and v: [P, k], pair p's candidate entries
    (row i of r takes u[p, first_row + i]); vsum: [P], sum_j v[p, j]
    in float64. Slot s holds two probes: pairs slots[s, 0] and slots[s, 1] (the same pair twice, or two
    pairs) at thetas[s, 0] and thetas[s, 1] (in r's dtype). out: [S, c, 4], per slot and row, for each of
    its probes, with e = r - theta u_i v_j: sum_j |e| and -u_i sum_j v_j s_j with s_j = sign(e) (the
    derivative of sum_j |e| in theta, where no e is zero; at e = 0 either sign gives a subgradient, and
    s_j = -1 is taken), computed as -u_i (2 sum_{e > 0} v_j - vsum). Entries with u_i v_j = 0 have e = r
    exactly and add nothing to the second sum. Rows are taken two at a time, so that each load of v serves
    both (the last row of an odd chunk is paired with itself and written once).
    """
    c, k = r.shape
    zero_t = r.dtype.type(0)
    for group in numba.prange((c + 1) // 2):
        i0 = 2 * group
        i1 = min(i0 + 1, c - 1)
        row0 = r[i0]
        row1 = r[i1]
        for s in range(slots.shape[0]):
            p, q = slots[s, 0], slots[s, 1]
            v_p = v[p]
            v_q = v[q]
            a0_p = thetas[s, 0] * u[p, first_row + i0]
            a0_q = thetas[s, 1] * u[q, first_row + i0]
            a1_p = thetas[s, 0] * u[p, first_row + i1]
            a1_q = thetas[s, 1] * u[q, first_row + i1]
            f0_p = 0.0
            f0_q = 0.0
            s0_p = 0.0
            s0_q = 0.0
            f1_p = 0.0
            f1_q = 0.0
            s1_p = 0.0
            s1_q = 0.0
            for start in range(0, k, SUM_BLOCK):
                stop = min(k, start + SUM_BLOCK)
                # slices indexed from 0: the loop then loads consecutive entries (indexed from ``start``, numba's
                # wraparound of negative indices makes LLVM gather them one by one, ~10x slower)
                vr_p = v_p[start:stop]
                vr_q = v_q[start:stop]
                x0r = row0[start:stop]
                x1r = row1[start:stop]
                run_f0_p = zero_t
                run_f0_q = zero_t
                run_s0_p = zero_t
                run_s0_q = zero_t
                run_f1_p = zero_t
                run_f1_q = zero_t
                run_s1_p = zero_t
                run_s1_q = zero_t
                for j in range(stop - start):
                    vj_p = vr_p[j]
                    vj_q = vr_q[j]
                    x0 = x0r[j]
                    x1 = x1r[j]
                    e0_p = x0 - a0_p * vj_p
                    e0_q = x0 - a0_q * vj_q
                    e1_p = x1 - a1_p * vj_p
                    e1_q = x1 - a1_q * vj_q
                    run_f0_p += abs(e0_p)
                    run_f0_q += abs(e0_q)
                    run_f1_p += abs(e1_p)
                    run_f1_q += abs(e1_q)
                    run_s0_p += vj_p if e0_p > zero_t else zero_t  # selects: branch-free
                    run_s0_q += vj_q if e0_q > zero_t else zero_t
                    run_s1_p += vj_p if e1_p > zero_t else zero_t
                    run_s1_q += vj_q if e1_q > zero_t else zero_t
                f0_p += run_f0_p
                f0_q += run_f0_q
                s0_p += run_s0_p
                s0_q += run_s0_q
                f1_p += run_f1_p
                f1_q += run_f1_q
                s1_p += run_s1_p
                s1_q += run_s1_q
            for i, f_p, s_p, f_q, s_q in ((i0, f0_p, s0_p, f0_q, s0_q), (i1, f1_p, s1_p, f1_q, s1_q)):
                out[s, i, 0] = f_p
                out[s, i, 1] = -np.float64(u[p, first_row + i]) * (2 * s_p - vsum[p])
                out[s, i, 2] = f_q
                out[s, i, 3] = -np.float64(u[q, first_row + i]) * (2 * s_q - vsum[q])


DUAL_ROWS = 4
"""``_dual_sums`` takes this many rows at a time, so that each load of a candidate vector serves all of them."""

DUAL_RUN = 512
"""``_dual_sums`` adds up runs of this many products in the residual's dtype before adding them to float64."""


def _dual_sums(r, v_signed, v_abs, du, dv, deflate, signed_out, abs_out, l1_out):  # pragma: no cover - compiled
    """The projections of sign(R) and |R| that the dual lower bounds need, over one residual chunk.

    r: [c, k]; v_signed: [n1, k] and v_abs: [n2, k] in r's dtype. If ``deflate``, first r_ij -= du_i dv_j
    in place (du: [c], dv: [k]; the product rounded, then the difference). Writes, per row i,
    signed_out[i, m] = sum_j sign(r_ij) v_signed[m, j], abs_out[i, m] = sum_j |r_ij| v_abs[m, j] and
    l1_out[i] = sum_j |r_ij|, all float64 from runs of terms added in r's dtype: DUAL_RUN terms for the
    projections, SUM_BLOCK for l1 (its rounding is that of the tangent sums: see ``tangents.zero_tangent``).
    """
    c, k = r.shape
    n1 = v_signed.shape[0]
    n2 = v_abs.shape[0]
    zero_t = r.dtype.type(0)
    one_t = r.dtype.type(1)
    if deflate:  # a loop of its own: deflating each row just before its sums below made that loop ~2x slower
        for i in numba.prange(c):
            dui = du[i]
            for j in range(k):
                r[i, j] = r[i, j] - dui * dv[j]
    for group in numba.prange((c + DUAL_ROWS - 1) // DUAL_ROWS):
        first = group * DUAL_ROWS
        n_rows = min(DUAL_ROWS, c - first)
        signs = np.empty((DUAL_ROWS, k), r.dtype)
        mags = np.empty((DUAL_ROWS if n2 else 0, k), r.dtype)  # |R| only where a projection takes it
        for t in range(n_rows, DUAL_ROWS):  # rows past the chunk's end add zero
            signs[t, :] = zero_t
            if n2:
                mags[t, :] = zero_t
        for t in range(n_rows):
            total = 0.0
            for start in range(0, k, SUM_BLOCK):
                stop = min(k, start + SUM_BLOCK)
                row = r[first + t, start:stop]  # indexed from 0, as in ``_tangent_sums``
                row_signs = signs[t, start:stop]
                run = zero_t
                if n2:
                    row_mags = mags[t, start:stop]
                    for j in range(stop - start):
                        x = row[j]
                        row_signs[j] = one_t if x > zero_t else (-one_t if x < zero_t else zero_t)
                        row_mags[j] = abs(x)
                        run += abs(x)
                else:  # the same loop without |R| (most steps: 13 % faster)
                    for j in range(stop - start):
                        x = row[j]
                        row_signs[j] = one_t if x > zero_t else (-one_t if x < zero_t else zero_t)
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
                stop = min(k, start + DUAL_RUN)
                vr, x0r, x1r, x2r, x3r = v[start:stop], x0[start:stop], x1[start:stop], x2[start:stop], x3[start:stop]
                e0 = zero_t
                e1 = zero_t
                e2 = zero_t
                e3 = zero_t
                for j in range(stop - start):
                    vj = vr[j]
                    e0 += x0r[j] * vj
                    e1 += x1r[j] * vj
                    e2 += x2r[j] * vj
                    e3 += x3r[j] * vj
                c0 += np.float64(e0)
                c1 += np.float64(e1)
                c2 += np.float64(e2)
                c3 += np.float64(e3)
            out = signed_out if m < n1 else abs_out
            col = m if m < n1 else m - n1
            for t, value in enumerate((c0, c1, c2, c3)):
                if t < n_rows:
                    out[first + t, col] = value


def _sample_brackets(p, q, us, vs, rows, cols, pair_a, pair_b, k_lo, k_hi, out):  # pragma: no cover
    """Every pair's sampled bracket in one parallel call: the k_lo-th and k_hi-th smallest (0-based) of
    ratio_t = (p[i_t] . q[j_t]) / (us[i_t, a] vs[j_t, b]) over the n sampled entries t, i_t = rows[a, t],
    j_t = cols[b, t], for each pair (a, b) = (pair_a, pair_b) (R = p q^T: p [d, s], q [k, s]; rows [Mu, n],
    cols [Mv, n]); writes out[pair] = (low, high).
    """
    n = rows.shape[1]
    s = p.shape[1]
    for pair in numba.prange(pair_a.shape[0]):
        a = pair_a[pair]
        b = pair_b[pair]
        ratios = np.empty(n, p.dtype)
        for t in range(n):
            i = rows[a, t]
            j = cols[b, t]
            dot = p.dtype.type(0)
            for m in range(s):
                dot += p[i, m] * q[j, m]
            ratios[t] = dot / (us[i, a] * vs[j, b])
        # the k-th smallest is the lower weighted median of unit weights at half = k + 1 (np.partition does
        # the same, but takes seconds longer to compile)
        ones = np.ones(n, p.dtype)
        out[pair, 0] = _weighted_select(ratios, ones, k_lo[pair] + 1.0)[0]
        out[pair, 1] = _weighted_select(ratios, ones, k_hi[pair] + 1.0)[0]


def _pair_medians(r, u, v, iu, iv, deltas, objectives):  # pragma: no cover - compiled
    """Every pair's exact fit over a list of entries, in parallel. Entry t is r[t] at row iu[t] and column
    iv[t]; for pair (a, b), with uv_t = u[iu[t], a] v[iv[t], b] (in u's dtype): deltas[a, b] = the lower
    weighted median of r_t / uv_t with weights |uv_t| (0 if every weight is 0; NaN where rounding leaves the
    total a hair above the selection's own sum, for the caller to sort), and objectives[a, b] =
    sum_t |r_t - delta uv_t| in float64."""
    n = r.shape[0]
    m_u = u.shape[1]
    m_v = v.shape[1]
    for pair in numba.prange(m_u * m_v):
        a = pair // m_v
        b = pair % m_v
        ratios = np.empty(n, r.dtype)
        weights = np.empty(n, u.dtype)
        uvs = np.empty(n, u.dtype)
        total = 0.0
        for t in range(n):
            uv = u[iu[t], a] * v[iv[t], b]
            uvs[t] = uv
            weights[t] = abs(uv)
            ratios[t] = r[t] / uv if uv != 0 else np.inf  # zero weights sort last and count nothing
            total += np.float64(abs(uv))
        delta = 0.0
        if total > 0:
            delta = _weighted_select(ratios, weights, total / 2)[0]
        objective = 0.0
        for t in range(n):
            objective += abs(np.float64(r[t]) - delta * np.float64(uvs[t]))
        deltas[a, b] = delta
        objectives[a, b] = objective


def _whole_step(r, u, v, powers, exhaustive, slack, tiny, bounds, deltas, objectives, fitted):  # pragma: no cover
    """One step of the fit of a small layer, whose whole residual r [d, k] is kept: every pair's dual lower bound
    (``_whole_bounds``), then the exact fit (``_entries_fit``) of the pairs in ascending order of their bounds,
    until a bound exceeds the best objective found by more than ``slack`` (relative) plus ``tiny``: the pairs left
    cannot win (as in ``screening._ceiling``). With ``exhaustive``, every pair is fitted.

    u: [Mu, d] and v: [Mv, k], the candidates in r's dtype; ``powers``, ``bounds.BOUND_POWERS``. Writes every
    pair's bound to bounds [Mu * Mv], the deltas and objectives [Mu, Mv] (float64) of the pairs fitted, and
    fitted[a, b] = 1 for them; returns how many were fitted.
    """
    d, k = r.shape
    m_v = v.shape[0]
    left, right, norm, c3 = _bound_terms(u, v, powers)
    _whole_bounds(r, left, right, norm, c3, bounds)
    order = np.argsort(bounds, kind="mergesort")  # ties keep the order of the pairs
    ratios = np.empty(d * k, r.dtype)
    weights = np.empty(d * k, r.dtype)
    uvs = np.empty(d * k, r.dtype)
    best = np.inf
    count = 0
    for pair in order:
        if not exhaustive and count > 0 and bounds[pair] > best + (slack * abs(best) + tiny):
            break  # sorted: every pair left has a bound at least as high
        a = pair // m_v
        b = pair % m_v
        total = 0.0
        v_b = v[b]
        for i in range(d):
            u_i = u[a, i]
            # slices indexed from 0, so that the loop vectorises (see ``_tangent_sums``)
            row = r[i]
            row_uv = uvs[i * k : (i + 1) * k]
            row_w = weights[i * k : (i + 1) * k]
            row_ratio = ratios[i * k : (i + 1) * k]
            for j in range(k):
                uv = u_i * v_b[j]
                row_uv[j] = uv
                row_w[j] = abs(uv)
                row_ratio[j] = row[j] / uv if uv != 0 else np.inf
                total += np.float64(abs(uv))
        delta, objective = _entries_fit(r.reshape(d * k), ratios, weights, uvs, total)
        deltas[a, b] = delta
        objectives[a, b] = objective
        fitted[a, b] = 1
        best = min(best, objective)
        count += 1
    return count


def _bound_terms(u, v, powers):  # pragma: no cover - compiled
    """What ``bounds.BoundTerms.of`` computes for each power alpha in ``powers`` (alpha = 0 first), in float64, from
    the candidates u: [Mu, d] and v: [Mv, k], laid out as ``_whole_bounds`` takes them: (left [P, 3, Mu, d],
    right [P, 3, Mv, k], norm [P, Mu, Mv], c3 [P, Mu, Mv]), with |x|^alpha the indicator of x != 0 for alpha = 0."""
    m_u, d = u.shape
    m_v, k = v.shape
    n_pow = powers.shape[0]
    left = np.empty((n_pow, 3, m_u, d))
    right = np.empty((n_pow, 3, m_v, k))
    norm = np.empty((n_pow, m_u, m_v))
    c3 = np.empty((n_pow, m_u, m_v))
    for power in range(n_pow):
        alpha = powers[power]
        for x, out in ((u, left), (v, right)):
            for m in range(x.shape[0]):
                for i in range(x.shape[1]):
                    value = np.float64(x[m, i])
                    size = abs(value)
                    raised = (1.0 if value != 0 else 0.0) if alpha == 0 else size**alpha
                    out[power, 0, m, i] = value * raised  # x |x|^alpha
                    out[power, 1, m, i] = raised  # |x|^alpha
                    out[power, 2, m, i] = np.sign(value) * raised  # sign(x) |x|^alpha
        for a in range(m_u):
            u_max = 0.0
            u_sum = 0.0
            for i in range(d):
                u_max = max(u_max, left[power, 1, a, i])
                u_sum += abs(left[power, 0, a, i])  # |u| |u|^alpha
            for b in range(m_v):
                v_max = 0.0
                v_sum = 0.0
                for j in range(k):
                    v_max = max(v_max, right[power, 1, b, j])
                    v_sum += abs(right[power, 0, b, j])
                norm[power, a, b] = u_max * v_max
                c3[power, a, b] = (u_sum * v_sum) / norm[power, a, b]
    return left, right, norm, c3


def _whole_bounds(r, left, right, norm, c3, bounds):  # pragma: no cover - compiled
    """Every pair's dual lower bound over the whole residual r [d, k]: that of ``bounds.DualBounds.of``, its sums
    taken over r in float64; bounds [Mu * Mv] (row-major), -inf where no certificate applies.

    For each power alpha of ``bounds.BOUND_POWERS`` (alpha = 0 first), what ``bounds.BoundTerms`` holds
    (``_bound_terms``), float64: left [P, 3, Mu, d] and right [P, 3, Mv, k], the factors that sign(R) (kind 0:
    u |u|^alpha, v |v|^alpha), |R| (kind 1: |u|^alpha, |v|^alpha) and R (kind 2: sign(u) |u|^alpha,
    sign(v) |v|^alpha, E's factors) are projected on; norm and c3 [P, Mu, Mv].
    """
    d, k = r.shape
    n_pow = left.shape[0]
    m_u = left.shape[2]
    m_v = right.shape[2]
    proj = np.zeros((n_pow, 3, d, m_v))  # each row of sign(R), |R| and R against each right-hand side
    rows = np.empty((3, k))
    l1 = 0.0
    for i in range(d):
        for j in range(k):
            x = np.float64(r[i, j])
            rows[0, j] = 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)
            rows[1, j] = abs(x)
            rows[2, j] = x
            l1 += abs(x)
        for power in range(n_pow):
            for kind in range(3):
                row = rows[kind]
                for b in range(m_v):
                    rhs = right[power, kind, b]
                    total = 0.0
                    for j in range(k):
                        total += row[j] * rhs[j]
                    proj[power, kind, i, b] = total
    sums = np.empty((n_pow, 3))
    for a in range(m_u):
        for b in range(m_v):
            for power in range(n_pow):
                for kind in range(3):
                    lhs = left[power, kind, a]
                    total = 0.0
                    for i in range(d):
                        total += lhs[i] * proj[power, kind, i, b]
                    sums[power, kind] = total
            c1 = sums[0, 0]  # <sign(R), u v^T>
            found = -np.inf
            for power in range(n_pow):
                scale = norm[power, a, b]
                tau = c1 / (c3[power, a, b] + np.sign(c1) * (sums[power, 0] / scale))
                bound = l1 - abs(tau) * (sums[power, 1] / scale) - tau * (sums[power, 2] / scale)
                if abs(tau) <= 1 and scale > 0 and c3[power, a, b] > 0 and bound > found:
                    found = bound
            bounds[a * m_v + b] = found


def _objectives64(p, q, u, v, deltas, out):  # pragma: no cover - compiled
    """out[pair, i] = sum_j |R_ij - deltas[pair] (u[pair, i] v[pair, j])| in float64, with R_ij = sum_l p_il q_jl
    formed in float64 (l ascending), for each pair over one chunk of rows: p [c, s], q [k, s], u [P, c],
    v [P, k]. Each row's terms go to eight interleaved lanes (term j to lane j mod 8), combined as
    ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)). Compiled without fastmath: this order, which
    ``fit._row_objectives64`` follows too, is the one computed on every CPU."""
    c, s = p.shape
    k = q.shape[0]
    for i in numba.prange(c):
        row = np.empty(k)
        for j in range(k):
            x = 0.0
            for col in range(s):
                x += np.float64(p[i, col]) * np.float64(q[j, col])
            row[j] = x
        lanes = np.empty(8)
        for pair in range(u.shape[0]):
            ui = np.float64(u[pair, i])
            delta = deltas[pair]
            lanes[:] = 0.0
            for j in range(k):
                lanes[j & 7] += abs(row[j] - delta * (ui * np.float64(v[pair, j])))
            low = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
            out[pair, i] = low + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


def _inverse_cdf(cdf, draws, out):  # pragma: no cover - compiled
    """out[t] = the first index i with cdf[i] > draws[t], or n - 1 if there is none (cdf: [n], nondecreasing):
    what a binary search finds, from a guide table (one bucket of [0, cdf[n - 1]] per entry) and a short scan,
    in time linear in n and the number of draws."""
    n = cdf.shape[0]
    total = cdf[n - 1]
    guide = np.empty(n, np.int64)  # guide[g]: the first index whose cdf exceeds the start of bucket g
    i = 0
    for g in range(n):
        edge = total * (g / n)
        while i < n - 1 and cdf[i] <= edge:
            i += 1
        guide[g] = i
    scale = n / total if total > 0 else 0.0
    for t in range(draws.shape[0]):
        x = draws[t]
        i = guide[int(min(max(x * scale, 0.0), n - 1.0))]
        while i > 0 and cdf[i - 1] > x:  # any start is made exact by the two scans
            i -= 1
        while i < n - 1 and cdf[i] <= x:
            i += 1
        out[t] = i


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
    _bracket_pass = numba.njit(
        parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"}
    )(_bracket_pass)
    _compact = numba.njit(cache=True, nogil=True)(_compact)
    _inverse_cdf = numba.njit(cache=True, nogil=True, error_model="numpy")(_inverse_cdf)
    _objectives64 = numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")(
        _objectives64
    )
    _sample_brackets = numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")(
        _sample_brackets
    )
    _sort_pairs = numba.njit(cache=True, nogil=True)(_sort_pairs)
    _pivots = numba.njit(cache=True, nogil=True)(_pivots)
    # fastmath 'reassoc': the float64 weight sums may be reordered (their order is arbitrary anyway)
    _weighted_median = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})(_weighted_median)
    _weighted_select = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})(_weighted_select)
    _entries_fit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})(_entries_fit)
    # fastmath 'reassoc': the float64 sums of the bounds and objectives may be reordered (they screen, or are
    # decided again in float64 at near ties: ``fit.best``)
    _bound_terms = numba.njit(cache=True, nogil=True, error_model="numpy")(_bound_terms)
    _whole_bounds = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})(
        _whole_bounds
    )
    _whole_step = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})(
        _whole_step
    )
    _weighted_select_rows = numba.njit(parallel=True, cache=True, nogil=True)(_weighted_select_rows)
    _pair_medians = numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})(
        _pair_medians
    )
    _tangent_sums = numba.njit(
        parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"}
    )(_tangent_sums)
    _dual_sums = numba.njit(
        parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"}
    )(_dual_sums)


def bracket_pass(
    r: np.ndarray, u: np.ndarray, v: np.ndarray, lo: float, hi: float, scratch: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the kernel on one chunk; returns (sums [5] float64, inside ratios [n], their weights [n]) with the
    ratios and weights in the dtype of ``r``.

    ``scratch`` caches the [c, k] buffers between calls with the same chunk shape.
    """
    key = r.shape
    if scratch.get("shape") != key:
        scratch.update(
            shape=key,
            ratios=np.empty(key, r.dtype),
            weights=np.empty(key, r.dtype),
            sums=np.empty((key[0], 5), np.float64),
            counts=np.empty(key[0], np.int64),
        )
    sums, counts = scratch["sums"], scratch["counts"]
    _bracket_pass(
        r,
        u,
        v,
        np.abs(v).min(initial=np.inf),
        *_in_dtype(lo, hi, r.dtype),
        sums,
        counts,
        scratch["ratios"],
        scratch["weights"],
    )
    n = int(counts.sum())
    out_ratios, out_weights = np.empty(n, r.dtype), np.empty(n, r.dtype)
    _compact(scratch["ratios"], scratch["weights"], counts, out_ratios, out_weights)
    return sums.sum(axis=0), out_ratios, out_weights


def _in_dtype(lo: float, hi: float, dtype) -> tuple[Any, Any]:
    """The bracket [lo, hi] in ``dtype``, rounded inward: for a ratio x of that dtype, x < lo exactly when x is
    below the result's low end, and x > hi exactly when x is above its high end (no value of the dtype lies
    between). The kernel then compares ratios in their own dtype (a float64 bound would convert every float32
    ratio: 1.6x slower) and partitions the entries exactly as against [lo, hi]."""
    kind = np.dtype(dtype).type
    with np.errstate(over="ignore"):
        lo_t, hi_t = kind(lo), kind(hi)
    if float(lo_t) < lo:  # compared in float64 (numpy would compare a Python float in lo_t's dtype)
        lo_t = np.nextafter(lo_t, kind(np.inf))
    if float(hi_t) > hi:
        hi_t = np.nextafter(hi_t, kind(-np.inf))
    return lo_t, hi_t


def sample_brackets(
    p: np.ndarray, q: np.ndarray, us: np.ndarray, vs: np.ndarray, rows: np.ndarray, cols: np.ndarray, pairs: np.ndarray
) -> np.ndarray:
    """Run ``_sample_brackets``; ``pairs`` [P, 4] holds (a, b, k_lo, k_hi); returns [P, 2] (low, high)."""
    out = np.empty((pairs.shape[0], 2), p.dtype)
    pair_a, pair_b, k_lo, k_hi = (np.ascontiguousarray(column) for column in pairs.T)
    _sample_brackets(p, q, us, vs, rows, cols, pair_a, pair_b, k_lo, k_hi, out)
    return out


def pair_medians(
    r: np.ndarray, u: np.ndarray, v: np.ndarray, iu: np.ndarray, iv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``_pair_medians``; returns (deltas, objectives), each [Mu, Mv] float64."""
    deltas, objectives = np.empty((u.shape[1], v.shape[1])), np.empty((u.shape[1], v.shape[1]))
    _pair_medians(r, u, v, iu, iv, deltas, objectives)
    return deltas, objectives


def objectives64(p: np.ndarray, q: np.ndarray, u: np.ndarray, v: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Run ``_objectives64``; returns [P, c] float64, each pair's per-row sums."""
    out = np.empty((u.shape[0], p.shape[0]))
    _objectives64(p, q, u, v, deltas, out)
    return out


def inverse_cdf(cdf: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Run ``_inverse_cdf``; returns [len(draws)] int64 (as searchsorted(cdf, draws, side="right"), clamped to
    len(cdf) - 1)."""
    out = np.empty(draws.shape[0], np.int64)
    _inverse_cdf(cdf, draws, out)
    return out


def tangent_sums(
    r: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    slots: np.ndarray,
    thetas: np.ndarray,
    row0: int = 0,
    vsum: np.ndarray | None = None,
) -> np.ndarray:
    """Run ``_tangent_sums`` on one chunk (rows row0, row0 + 1, ... of u's); returns [S, 4] float64 (the per-row
    sums added up). ``vsum``, if given, is v.sum(axis=1) in float64, the same for every chunk."""
    out = np.empty((slots.shape[0], r.shape[0], 4), np.float64)
    vsum = v.sum(axis=1, dtype=np.float64) if vsum is None else vsum
    _tangent_sums(r, u, row0, v, slots, thetas.astype(r.dtype, copy=False), vsum, out)
    return out.sum(axis=1)


def weighted_select_rows(ratios: np.ndarray, weights: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """``weighted_select`` on every row of ``ratios`` / ``weights`` [P, n] (reordered in place); [P] float64."""
    out = np.empty(ratios.shape[0])
    _weighted_select_rows(ratios, weights, halves, out)
    return out


def dual_sums(
    r: np.ndarray, v_signed: np.ndarray, v_abs: np.ndarray, deflation: tuple | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``_dual_sums`` on one chunk, first subtracting outer(*deflation) from it in place if given;
    returns (signed [c, n1], absolute [c, n2], l1 [c]), all float64."""
    c = r.shape[0]
    signed, absolute, l1 = np.empty((c, v_signed.shape[0])), np.empty((c, v_abs.shape[0])), np.empty(c)
    du, dv = deflation if deflation is not None else (np.zeros(c, r.dtype), np.zeros(r.shape[1], r.dtype))
    _dual_sums(r, v_signed, v_abs, du, dv, deflation is not None, signed, absolute, l1)
    return signed, absolute, l1


def weighted_select(ratios: np.ndarray, weights: np.ndarray, half: float) -> tuple[float, float]:
    """The lower weighted median of ``ratios`` once ``half`` of the total weight is known, and the sum of
    weight * |ratio - median| over them (see ``_weighted_select``); the arrays are reordered in place."""
    delta, spread = _weighted_select(ratios, weights, half)
    return float(delta), float(spread)


def set_threads(n: int) -> None:
    if available:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def whole_step(
    r: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    powers: tuple[int, ...],
    exhaustive: bool,
    slack: float,
    tiny: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run ``_whole_step`` with the dual bounds of ``powers`` (``bounds.BOUND_POWERS``). Returns (deltas,
    objectives, fitted, bounds), each [Mu, Mv]: fitted True for the pairs fitted exactly (the others' deltas and
    objectives are not set), bounds every pair's dual lower bound."""
    shape = (u.shape[0], v.shape[0])
    deltas, objectives, fitted = np.empty(shape), np.empty(shape), np.zeros(shape, np.uint8)
    bounds = np.empty(shape[0] * shape[1])
    _whole_step(r, u, v, np.asarray(powers, np.int64), exhaustive, slack, tiny, bounds, deltas, objectives, fitted)
    return deltas, objectives, fitted.astype(bool), bounds.reshape(shape)
