"""The fast MAS-SVD / SSI path against the dense, literal float64 reference in tests/reference.py."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from profiles import examples
from reference import reference, weighted_lower_median

from s3lora_cli.engine import (
    Method,
    bounds,
    exact,
    fit,
    kernels,
    l1_fit,
    mas_svd,
    mas_svd_candidates,
    residual,
    screening,
    ssi,
    state,
    tangents,
)
from s3lora_cli.engine.bounds import BOUND_POWERS
from s3lora_cli.engine.residual import Residual, read_pass
from s3lora_cli.engine.screening import lower_bounds
from s3lora_cli.engine.tangents import envelope_bounds
from s3lora_cli.engine.tangents import narrowed as narrowed_bracket
from s3lora_cli.engine.tangents import tangents as tangents_of

B_CHECK = [[2, 1], [1, -1], [0, 3], [-1, 2], [4, 0.5]]
A_CHECK = [[1, 0, -2, 1], [0.5, 1, 1, -1]]


# ---------------------------------------------------------------------------------------------- worked check


@pytest.mark.parametrize("exhaustive", [False, True])
def test_worked_check_float64(exhaustive):
    b, a = torch.tensor(B_CHECK, dtype=torch.float64), torch.tensor(A_CHECK, dtype=torch.float64)
    s = mas_svd(b, a, components=2, top_h=2, exhaustive=exhaustive)
    assert [(p.a, p.b) for p in s.picks] == [(1, 1), (2, 2)]
    assert s.sigma == pytest.approx((331.5348535575, 161.5729241058), rel=1e-9)
    assert s.ssi == pytest.approx(0.6723375049, abs=1e-9)
    assert mas_svd(b, a, components=2, top_h=2, method=Method.SVD).ssi == pytest.approx(0.6872004952, abs=1e-9)


def test_worked_check_float32():
    b, a = torch.tensor(B_CHECK, dtype=torch.float32), torch.tensor(A_CHECK, dtype=torch.float32)
    s = mas_svd(b, a)
    assert [(p.a, p.b) for p in s.picks] == [(1, 1), (2, 2)]
    assert s.sigma == pytest.approx((331.5348535575, 161.5729241058), rel=1e-5)
    assert s.ssi == pytest.approx(0.6723375049, rel=1e-5)
    assert mas_svd(b, a, method=Method.SVD).ssi == pytest.approx(0.6872004952, rel=1e-5)


def test_reference_reproduces_worked_check():
    ref = reference(np.array(B_CHECK) @ np.array(A_CHECK), rank=2)
    assert [p[:2] for p in ref.picks] == [(1, 1), (2, 2)]
    assert ref.ssi == pytest.approx(0.6723375049, abs=1e-9)


# ---------------------------------------------------------------------------------------------- engines

ENGINES = {
    # the defaults: small inputs keep their whole residual, one compiled call per step fits the pairs left by the bounds
    "default": {},
    # the same without numba: every pair fitted, its ratios sorted
    "whole-torch": {"kernels.available": False},
    # one pass per step over all pairs, without screening
    "unscreened": {"WHOLE_MAX_ENTRIES": 0, "KERNEL_MIN_ENTRIES": 1 << 62},
    # screening on every input, the tensor implementation of the pass
    "torch": {"WHOLE_MAX_ENTRIES": 0, "SCREEN_MIN_ENTRIES": 0, "KERNEL_MIN_ENTRIES": 1 << 62},
    # screening on every input, the compiled kernel on every chunk
    "kernel": {"WHOLE_MAX_ENTRIES": 0, "SCREEN_MIN_ENTRIES": 0, "KERNEL_MIN_ENTRIES": 0},
    # tiny samples and chunks: sampled brackets, their misses and widening, many chunks per pass
    "tiny": {
        "WHOLE_MAX_ENTRIES": 0,
        "SCREEN_MIN_ENTRIES": 0,
        "KERNEL_MIN_ENTRIES": 0,
        "SAMPLE_SIZE": 8,
        "CHUNK_ENTRIES": 5,
        "ESTIMATE_SAMPLE": 4,
    },
    # residuals too large to keep: every pass forms its chunks again from the factors
    "uncached": {
        "WHOLE_MAX_ENTRIES": 0,
        "SCREEN_MIN_ENTRIES": 0,
        "KERNEL_MIN_ENTRIES": 0,
        "CACHE_ENTRIES": 0,
        "CHUNK_ENTRIES": 7,
    },
    # residuals kept in part: the first chunks deflated in place, the others formed again in every pass
    "partial": {
        "WHOLE_MAX_ENTRIES": 0,
        "SCREEN_MIN_ENTRIES": 0,
        "KERNEL_MIN_ENTRIES": 0,
        "CACHE_ENTRIES": 30,
        "CHUNK_ENTRIES": 7,
    },
}


ENGINE_MODULES = (bounds, exact, fit, residual, screening, state, tangents)


def owner(name: str):
    """The engine module that defines the setting ``name`` (the one place to change it)."""
    found = [
        module for module in ENGINE_MODULES if re.search(rf"^{name} = ", inspect.getsource(module), flags=re.MULTILINE)
    ]
    assert len(found) == 1, (name, found)
    return found[0]


class engine:
    """Run the fast path with one engine's settings (a context manager, so hypothesis can use it)."""

    def __init__(self, name: str) -> None:
        self.settings = ENGINES[name]
        self.mp = pytest.MonkeyPatch()

    def __enter__(self):
        if self.settings.get("KERNEL_MIN_ENTRIES") == 0 and not kernels.available:
            pytest.skip("numba is not available")
        for key, value in self.settings.items():
            module, _, name = key.rpartition(".")
            self.mp.setattr(kernels if module == "kernels" else owner(name), name, value)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


# ---------------------------------------------------------------------------------------------- inputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def lora_factors(draw, max_dim: int = 14, max_rank: int = 5):
    """(B [d, r], A [r, k]) from families: gaussian, heavy-tailed, outliers, integer-valued, sparse,
    low-rank (dependent columns of B), and any storage dtype (values rounded to it)."""
    d = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, max_rank))
    seed = draw(st.integers(0, 2**32 - 1))
    family = draw(st.sampled_from(["gaussian", "heavy", "outliers", "integers", "sparse", "lowrank", "scaled"]))
    rng = np.random.default_rng(seed)
    b, a = rng.standard_normal((d, r)), rng.standard_normal((r, k))
    if family == "heavy":
        b, a = rng.standard_t(1.5, (d, r)), rng.standard_t(1.5, (r, k))
    elif family == "outliers":
        b[rng.integers(d), rng.integers(r)] *= 1e3
        a[rng.integers(r), rng.integers(k)] *= -1e3
    elif family == "integers":
        b, a = rng.integers(-3, 4, (d, r)).astype(float), rng.integers(-3, 4, (r, k)).astype(float)
    elif family == "sparse":
        b *= rng.random((d, r)) < 0.5
        a *= rng.random((r, k)) < 0.5
    elif family == "lowrank" and r > 1:
        b[:, -1] = b[:, 0] * 0.5  # rank r - 1
    elif family == "scaled":
        b *= 10.0 ** rng.integers(-4, 4)
    storage = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    b = torch.tensor(b).to(storage).to(torch.float64)
    a = torch.tensor(a).to(storage).to(torch.float64)
    return b, a, family


def _well_posed(ref, dw: np.ndarray, rel_gap: float) -> bool:
    """The spec's result is unique: candidate singular values distinct (and clearly zero or not), and
    each step's best objective beats the runner-up by a relative margin."""
    if not np.all(np.isfinite(dw)) or np.abs(dw).max() > 1e12:
        return False
    wt = dw / (np.linalg.norm(dw, axis=1) + 1e-8)[:, None]
    wh = wt / (np.linalg.norm(wt, axis=0) + 1e-8)[None, :]
    for mat in (wt, wh):
        s = np.linalg.svd(mat, compute_uv=False)
        if s.size == 0 or s[0] == 0:
            continue
        rel = s / s[0]
        if np.any((rel > 1e-12) & (rel < 1e-6)):
            return False
        kept = rel[rel > 1e-6]
        if kept.size > 1 and np.min(-np.diff(kept)) < rel_gap:
            return False
    if any(m < rel_gap for m in ref.margins):
        return False
    for objs in ref.objectives:
        flat = np.sort(objs.ravel())
        if flat.size > 1 and flat[1] - flat[0] <= rel_gap * max(flat[0], 1e-300) + 1e-12 * np.abs(dw).sum():
            return False
    return True


def _product_sensitivity(b, a, ref, kw) -> tuple[float, np.ndarray]:
    """How far the spec's SSI and S' move when dW = B A is perturbed as computing it from the factors in float32
    may perturb it: entry (i, j) by up to gamma_r (|B| |A|)_ij, gamma_r = r u / (1 - r u), u = 2^-24 (Higham,
    Accuracy and Stability of Numerical Algorithms, Thm 3.5). A float32 engine works from the factors, so it
    cannot be closer to the float64 reference than this, whatever it does: where B A cancels (|dW_ij| much
    smaller than (|B| |A|)_ij) that is far more than float32's own precision. Estimated on the extreme
    perturbations: all entries up, all down, and four seeded random sign patterns."""
    r = b.shape[1]
    u = 2.0**-24
    gamma = r * u / (1 - r * u)
    dw, size = (b @ a).numpy(), (b.abs() @ a.abs()).numpy() * gamma
    rng = np.random.default_rng(0)
    signs = [np.ones_like(dw), -np.ones_like(dw)] + [rng.choice([-1.0, 1.0], dw.shape) for _ in range(4)]
    d_ssi, d_sigma = 0.0, np.zeros_like(ref.sigma)
    for sign in signs:
        moved = reference(dw + sign * size, rank=r, **kw)
        d_ssi = max(d_ssi, abs(moved.ssi - ref.ssi))
        n = min(len(moved.sigma), len(ref.sigma))
        d_sigma[:n] = np.maximum(d_sigma[:n], np.abs(moved.sigma[:n] - ref.sigma[:n]))
    return d_ssi, d_sigma


def _check_against_reference(b, a, compute_dtype, rel_gap, tol, posed=assume, **kw):
    """The fast path in compute_dtype against the float64 reference: the same picks, and SSI and S' to tol
    relative, plus (in float32) twice what the inputs' own float32 product may move them
    (``_product_sensitivity``): the reference rounds nothing, so both sides' rounding of the product counts."""
    dw = (b @ a).numpy()
    r = b.shape[1]
    ref = reference(dw, rank=r, **kw)
    posed(_well_posed(ref, dw, rel_gap))
    d_ssi, d_sigma = 0.0, np.zeros_like(ref.sigma)
    if compute_dtype == torch.float32:
        d_ssi, d_sigma = _product_sensitivity(b, a, ref, kw)
    kw["method"] = Method(kw.get("method", "mas-svd"))
    fast = mas_svd(b.to(compute_dtype), a.to(compute_dtype), **kw)
    assert [(p.a, p.b) for p in fast.picks] == [p[:2] for p in ref.picks]
    assert abs(fast.ssi - ref.ssi) <= tol * abs(ref.ssi) + 2 * d_ssi + 1e-12
    scale = max(ref.sigma.max(initial=0.0), 1e-300)
    n = len(fast.sigma)
    assert np.all(
        np.abs(np.asarray(fast.sigma) - ref.sigma[:n]) <= tol * np.abs(ref.sigma[:n]) + tol * scale + 2 * d_sigma[:n]
    )
    return fast, ref


COMMON = settings(
    max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)


@pytest.mark.parametrize("name", list(ENGINES))
@COMMON
@given(case=lora_factors())
def test_fast_path_matches_reference_float64(name, case):
    b, a, _ = case
    with engine(name):
        fast, ref = _check_against_reference(b, a, torch.float64, 1e-9, 1e-8)
    for p, q in zip(fast.picks, ref.picks, strict=True):
        assert type(p.a) is int and type(p.b) is int and type(p.delta) is float  # as JSON takes them
        # delta is relative to u and v, whose signs are arbitrary: compare magnitudes
        assert abs(p.delta) == pytest.approx(abs(q[2]), rel=1e-8, abs=1e-12 * np.abs(ref.sigma).max(initial=1))


@pytest.mark.parametrize("name", list(ENGINES))
@COMMON
@given(case=lora_factors())
def test_fast_path_matches_reference_float32(name, case):
    b, a, _ = case
    with engine(name):
        _check_against_reference(b, a, torch.float32, 1e-3, 1e-5)


def _must_hold(condition: bool) -> None:
    assert condition


@pytest.mark.parametrize("name", list(ENGINES))
def test_float32_tolerance_follows_the_conditioning_of_the_product(name):
    """dW = B A with cancellation (1 x 1: 2.0409 * -0.5678 - 2.5557 * -0.4526 = -0.00211, from terms of 1.16):
    any float32 product of the factors is off by ~1e-5 relative, and SSI with it (eps_s makes SSI depend on
    the scale); the fast path is held to what the product's conditioning allows, no more."""
    b = torch.tensor([[2.0409, -2.5557, 0.0]]).float().double()
    a = torch.tensor([[-0.5678], [-0.4526], [-0.0]]).float().double()
    with engine(name):
        fast, ref = _check_against_reference(b, a, torch.float32, 1e-3, 1e-5, posed=_must_hold)
    assert abs(fast.ssi - ref.ssi) > 1e-5 * ref.ssi  # the case is one where a plain 1e-5 could not hold


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(lora_factors(), st.sampled_from(["spsvd", "svd"]), st.integers(1, 6), st.integers(1, 6))
def test_ablations_and_parameters_match_reference(case, method, m, h):
    b, a, _ = case
    _check_against_reference(b, a, torch.float64, 1e-9, 1e-8, method=method, components=m, top_h=h)


@pytest.mark.parametrize("name", ["kernel", "torch"])
@settings(max_examples=examples(12), deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(24, 64), st.integers(24, 64))
def test_near_tie_steps_never_change_the_result(name, seed, d, k):
    """Updates with one dominant direction (as trained adapters often have): once it is taken, the steps are near
    ties (here every step is handled so, NEAR_TIE_GAIN = 1): at the first the dual bounds are taken first and the
    pair they favour evaluated next, at the others the pair the last step's bounds favour is evaluated with them.
    The picks are those of the exhaustive fit."""
    rng = np.random.default_rng(seed)
    b = torch.tensor(rng.standard_normal((d, 8)) / np.arange(1, 9))
    b[:, 0] *= 20.0
    a = torch.tensor(rng.standard_normal((8, k)))
    with_bounds = []  # how many pairs each pass of the dual bounds evaluated
    original = exact.exact_pairs

    def recording(res, us, vs, pairs, state, riders=()):
        if any(isinstance(rider, bounds.DualSums) for rider in riders):
            with_bounds.append(len(pairs))
        return original(res, us, vs, pairs, state, riders)

    with engine(name), pytest.MonkeyPatch.context() as mp:
        mp.setattr(exact, "exact_pairs", recording)
        mp.setattr(owner("NEAR_TIE_GAIN"), "NEAR_TIE_GAIN", 1.0)
        screened = mas_svd(b.float(), a.float())
        exhaustive = mas_svd(b.float(), a.float(), exhaustive=True)
    assert 0 in with_bounds and 1 in with_bounds
    assert [(p.a, p.b, p.delta) for p in screened.picks] == [(p.a, p.b, p.delta) for p in exhaustive.picks]
    assert screened.ssi == exhaustive.ssi


@pytest.mark.parametrize("name", ["default", "torch", "kernel", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=lora_factors())
def test_screening_never_changes_the_result(name, dtype, case):
    b, a, _ = case
    with engine(name):
        screened = mas_svd(b.to(dtype), a.to(dtype))
        exhaustive = mas_svd(b.to(dtype), a.to(dtype), exhaustive=True)
    # the same pairs and deltas; an objective's last bits depend on how the pass split the entries
    assert [(p.a, p.b, p.delta) for p in screened.picks] == [(p.a, p.b, p.delta) for p in exhaustive.picks]
    for got, want in zip(screened.picks, exhaustive.picks, strict=True):
        assert got.objective == pytest.approx(want.objective, rel=fit.NEAR_TIE * torch.finfo(dtype).eps)
    assert screened.ssi == exhaustive.ssi
    assert screened.pairs_exact <= exhaustive.pairs_exact == exhaustive.pairs_total


# ---------------------------------------------------------------------------------------------- invariances


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(lora_factors(), st.integers(0, 2**32 - 1))
def test_invariances(case, seed):
    """Row and column permutations and a global sign change leave picks, S' and SSI unchanged; scaling
    dW by c scales S' by c^3 (the fit, rbar and cbar each scale by c)."""
    b, a, family = case
    dw = (b @ a).numpy()
    ref = reference(dw, rank=b.shape[1])
    assume(_well_posed(ref, dw, 1e-9))
    base = mas_svd(b, a)
    rng = np.random.default_rng(seed)
    rows, cols = torch.tensor(rng.permutation(b.shape[0])), torch.tensor(rng.permutation(a.shape[1]))
    for variant in (mas_svd(b[rows], a[:, cols]), mas_svd(-b, a)):
        assert [(p.a, p.b) for p in variant.picks] == [(p.a, p.b) for p in base.picks]
        assert variant.ssi == pytest.approx(base.ssi, rel=1e-8, abs=1e-12)
    norms_b = torch.linalg.norm(b @ a, dim=1)
    norms_c = torch.linalg.norm(b @ a, dim=0)
    # eps_n = 1e-8 is added to every norm: the c^3 law holds to 1e-5 only where it is negligible next to them
    assume(bool((norms_b[norms_b > 0] > 1e-2).all()) and bool((norms_c[norms_c > 0] > 1e-2).all()))
    scaled = mas_svd(2.0 * b, a)
    expected = 8.0 * np.array(base.sigma)
    assert np.allclose(scaled.sigma, expected, rtol=1e-5, atol=1e-9 * expected.max(initial=0.0))


# ---------------------------------------------------------------------------------------------- the fit's rules


def test_weighted_lower_median_rule():
    assert weighted_lower_median(np.array([4.0, 1.0, 3.0, 2.0]), np.ones(4)) == 2.0  # cum 2/4 reaches half at 2
    assert weighted_lower_median(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 3.0])) == 3.0


@pytest.mark.parametrize("name", list(ENGINES))
def test_fit_ties_go_to_smallest_pair_and_pairs_repeat(name):
    with engine(name):
        dw_left = torch.tensor([[3.0], [1.0], [-2.0]], dtype=torch.float64)
        dw_right = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        u = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
        us = torch.cat([u, u], dim=1)  # two identical candidates: identical objectives, (1, 1) must win
        vs = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
        for exhaustive in (False, True):
            picks, _, _ = l1_fit(dw_left, dw_right, us, vs, steps=3, exhaustive=exhaustive)
            assert [(p.a, p.b) for p in picks] == [(1, 1), (1, 1), (1, 1)]
            assert picks[0].delta == 3.0 and picks[1].delta == 0.0


@pytest.mark.parametrize("name", list(ENGINES))
def test_fit_objective_and_delta_are_literal(name):
    with engine(name):
        rng = np.random.default_rng(7)
        left, right = rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
        us, vs = np.linalg.qr(rng.standard_normal((6, 3)))[0], np.linalg.qr(rng.standard_normal((5, 2)))[0]
        picks, _, _ = l1_fit(torch.tensor(left), torch.tensor(right), torch.tensor(us), torch.tensor(vs), steps=2)
        R = left @ right
        for p in picks:
            u, v = us[:, p.a - 1], vs[:, p.b - 1]
            uv = np.outer(u, v)
            assert p.delta == pytest.approx(weighted_lower_median((R / uv).ravel(), np.abs(uv).ravel()), rel=1e-12)
            assert p.objective == pytest.approx(np.abs(R - p.delta * uv).sum(), rel=1e-10)
            best = min(
                np.abs(
                    R
                    - weighted_lower_median(
                        (R / np.outer(us[:, i], vs[:, j])).ravel(), np.abs(np.outer(us[:, i], vs[:, j])).ravel()
                    )
                    * np.outer(us[:, i], vs[:, j])
                ).sum()
                for i in range(us.shape[1])
                for j in range(vs.shape[1])
            )
            assert p.objective == pytest.approx(best, rel=1e-10)
            R = R - p.delta * uv


@settings(max_examples=examples(40), deadline=None)
@given(
    st.integers(1, 23),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(0, 60),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
)
def test_residual_chunks_are_the_rows_of_r(d, k, s, cache, chunk, seed):
    """Every pass hands out each row of R = p q^T once, as the factors give it: the chunks kept (up to
    CACHE_ENTRIES) and those formed again in one reused buffer (the last one shorter), before and after a
    deflation (the kept ones owe the pick until a pass subtracts it)."""
    rng = np.random.default_rng(seed)
    p, q = torch.tensor(rng.standard_normal((d, s))).float(), torch.tensor(rng.standard_normal((k, s))).float()
    u, v = torch.tensor(rng.standard_normal(d)).float(), torch.tensor(rng.standard_normal(k)).float()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner("CACHE_ENTRIES"), "CACHE_ENTRIES", cache)
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", chunk)
        residual = Residual(p, q)
        for _ in range(2):
            seen = [(rows, part.clone()) for rows, part in residual.chunks()]
            assert [r for rows, _ in seen for r in range(rows.start, rows.stop)] == list(range(d))
            exact = (residual.p.double() @ residual.q.double().T).float()
            for rows, part in seen:
                assert torch.allclose(part, exact[rows], rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
            residual = residual.deflate(0.5, u, v)


def _near_tie_case(seed, d, k, dtype, extra_columns=0):
    """A residual's factors p [d, 2 + extra], q [k, 2 + extra] and candidates us [d, 3], vs [k, 2], with deltas
    in steps of 0.5 (repeated deltas and, half the time, a repeated candidate give exact ties)."""
    rng = np.random.default_rng(seed)
    s = 2 + extra_columns
    p, q = torch.tensor(rng.standard_normal((d, s))).to(dtype), torch.tensor(rng.standard_normal((k, s))).to(dtype)
    us, vs = torch.tensor(rng.standard_normal((d, 3))).to(dtype), torch.tensor(rng.standard_normal((k, 2))).to(dtype)
    deltas = rng.integers(-2, 3, (3, 2)) * 0.5
    if rng.random() < 0.5:
        us[:, 2] = us[:, 0]
    return p, q, us, vs, deltas


@pytest.mark.parametrize("compiled", [False, True])
@settings(max_examples=examples(40), deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.integers(1, 13), st.integers(1, 11), st.sampled_from([torch.float32, torch.float64])
)
def test_near_ties_are_decided_in_float64(compiled, seed, d, k, dtype):
    """Pairs whose objectives are within rounding of the best are compared on sum |R - delta u v^T| decided in
    float64, with R formed in float64 from the residual's factors (never from a compute-dtype matrix product,
    whose last bits depend on the CPU): the winner (ties to the smallest pair) and its objective are those of
    the literal float64 computation, to its rounding, compiled or not, over chunks that split the rows."""
    if compiled and not kernels.available:
        pytest.skip("numba is not available")
    p, q, us, vs, deltas = _near_tie_case(seed, d, k, dtype)
    evaluated = {(a, b): (float(deltas[a, b]), 1.0) for a in range(3) for b in range(2)}  # all tied as reported
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "available", compiled)
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", 2 * k)
        pair, (delta, objective) = fit.best(Residual(p, q), us, vs, evaluated)
    p64, q64, u64, v64 = (t.double().numpy() for t in (p, q, us, vs))
    r = p64 @ q64.T
    exact, bound = {}, {}
    for a in range(3):
        for b in range(2):
            uv = deltas[a, b] * np.outer(u64[:, a], v64[:, b])
            terms = np.abs(r - uv)
            exact[a, b] = float(terms.sum())
            # Both sides' rounding (u = 2^-53 each): R_ij as a sum of s products, at most s u sum_l |p_il q_jl|
            # (products of float32 factors are exact; of float64 ones, one rounding each); the term, two more
            # roundings of |delta u_i v_j| and |e_ij|; the sums of d k terms, at most (d + k) u of their total.
            # Doubled: the reference rounds as much as the code.
            u = 2.0**-53
            bound[a, b] = (
                2
                * u
                * (
                    (p64.shape[1] + 1) * float((np.abs(p64) @ np.abs(q64).T).sum())
                    + 2 * float(np.abs(uv).sum())
                    + (d + k + 2) * exact[a, b]
                )
            )
    expected = min(exact, key=lambda ab: (exact[ab], ab))
    if pair != expected:  # only a difference within rounding of the float64 sums may decide otherwise
        assert exact[pair] - exact[expected] <= bound[pair] + bound[expected]
    assert delta == deltas[pair]
    assert abs(objective - exact[pair]) <= bound[pair]


@settings(max_examples=examples(30), deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 40),
    st.integers(1, 37),
    st.integers(0, 5),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_near_tie_objectives_have_the_same_bits_on_every_path(seed, d, k, extra, dtype):
    """The float64 objectives of near ties do not depend on the path (compiled or tensor), the chunking or the
    thread count: the same bits, so that the pick is the same on every machine."""
    if not kernels.available:
        pytest.skip("numba is not available")
    p, q, us, vs, deltas = _near_tie_case(seed, d, k, dtype, extra)
    pairs = [(a, b) for a in range(3) for b in range(2)]
    values = [float(deltas[pair]) for pair in pairs]
    results, before = [], kernels.numba.get_num_threads()
    for compiled, chunk, threads in [(True, 1 << 20, 2), (True, k, 1), (False, 1 << 20, 2), (False, 3 * k, 1)]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "available", compiled)
            mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", chunk)
            kernels.set_threads(threads)
            try:
                results.append(fit.objectives64(p, q, us, vs, pairs, values))
            finally:
                kernels.set_threads(before)
    assert all(result == results[0] for result in results[1:]), results


@pytest.mark.parametrize("use_kernel", [False, True])
@settings(max_examples=examples(60), deadline=None)
@given(lora_factors(), st.integers(0, 2**32 - 1), st.booleans())
def test_lower_bounds_are_lower_bounds(use_kernel, case, seed, zeros):
    """Also with zero entries in the candidates (the |R| sums then cannot come from the row sums), and with
    alpha = 0 alone (as the screening takes them away from near ties)."""
    if use_kernel and not kernels.available:
        pytest.skip("numba is not available")
    b, a, _ = case
    rng = np.random.default_rng(seed)
    us = torch.tensor(np.linalg.qr(rng.standard_normal((b.shape[0], min(3, b.shape[0]))))[0])
    vs = torch.tensor(np.linalg.qr(rng.standard_normal((a.shape[1], min(3, a.shape[1]))))[0])
    if zeros:
        us[torch.from_numpy(rng.random(us.shape[0]) < 0.3)] = 0
        vs[torch.from_numpy(rng.random(vs.shape[0]) < 0.3)] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner("KERNEL_MIN_ENTRIES"), "KERNEL_MIN_ENTRIES", 0 if use_kernel else 1 << 62)
        # several chunks, most a few rows short of the kernel's groups
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", 23)
        bounds, l1 = lower_bounds(b, a.T, us, vs)
        first, l1_first = lower_bounds(b, a.T, us, vs, BOUND_POWERS[:1])
    assert l1_first == l1
    # each pair keeps its best bound: more powers never make it worse (to rounding: BLAS may add up a product's
    # terms in another order when it has more columns, as the tensor implementation's products then do)
    assert torch.all(first <= bounds + 1e-12 * l1)
    R = (b @ a).numpy()
    assert l1 == pytest.approx(np.abs(R).sum(), rel=1e-12, abs=1e-300)
    for i in range(us.shape[1]):
        for j in range(vs.shape[1]):
            uv = np.outer(us[:, i].numpy(), vs[:, j].numpy())
            nz = uv != 0
            delta = weighted_lower_median(R[nz] / uv[nz], np.abs(uv[nz])) if nz.any() else 0.0
            exact = np.abs(R - delta * uv).sum()
            assert float(bounds[i, j]) <= exact * (1 + 1e-9) + 1e-12
            assert float(first[i, j]) <= exact * (1 + 1e-9) + 1e-12


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(60), deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 2 * kernels.DUAL_RUN + 3),
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.float32, np.float64]),
)
def test_dual_sums_kernel_matches_float64(rows, cols, n_signed, n_abs, seed, dtype):
    """sign(R) @ V1, |R| @ V2 and the row sums of |R| from the kernel, against float64, to the rounding of runs
    of DUAL_RUN terms (SUM_BLOCK for l1); rows and columns past the kernel's groups and runs, zeros in R."""
    rng = np.random.default_rng(seed)
    r = (rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.8)).astype(dtype)
    v1, v2 = rng.standard_normal((n_signed, cols)).astype(dtype), rng.standard_normal((n_abs, cols)).astype(dtype)
    signed, absolute, l1 = kernels.dual_sums(r, v1, v2)
    r64, eps = r.astype(np.float64), np.finfo(dtype).eps
    for found, x, v in ((signed, np.sign(r64), v1), (absolute, np.abs(r64), v2)):
        exact = x @ v.astype(np.float64).T
        assert found.shape == exact.shape
        assert np.all(np.abs(found - exact) <= (kernels.DUAL_RUN + 2) * eps * (np.abs(x) @ np.abs(v.T)) + 1e-300)
    assert np.all(np.abs(l1 - np.abs(r64).sum(1)) <= (kernels.SUM_BLOCK + 2) * eps * np.abs(r64).sum(1))


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(60), deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["between", "on", "huge", "infinite"]), st.booleans())
def test_bracket_pass_partitions_as_in_float64(seed, ends, tiny):
    """The exact pass's kernel, given a float64 bracket, keeps exactly the float32 ratios a float64 comparison
    puts inside it and sums the rest on the right side: bracket ends between two float32 values, on one,
    past float32's range and infinite; zero weights (u_i = 0, or tiny u_i and v_j whose product underflows
    to 0) count |r| only."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((7, 300)).astype(np.float32)
    u, v = rng.standard_normal(7).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    u[rng.random(7) < 0.3] = 0
    if tiny:  # products of two of these are below float32's smallest subnormal
        u[rng.random(7) < 0.5] *= np.float32(1e-25)
        v[rng.random(300) < 0.5] *= np.float32(1e-25)
    uv = u[:, None] * v[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = r / uv  # the float32 quotients, as the kernel forms them
    pick = np.sort(ratio[uv != 0].astype(np.float64))
    if pick.size == 0:
        pick = np.zeros(2)
    x_lo, x_hi = pick[pick.size // 4], pick[3 * pick.size // 4]

    def quarter(x, to):  # a quarter ulp past a ratio (which is then outside), nearer to it than to the next float32
        return x + (float(np.nextafter(np.float32(x), np.float32(to))) - x) / 4

    lo, hi = {
        "between": (quarter(x_lo, np.inf), quarter(x_hi, -np.inf)),
        "on": (x_lo, x_hi),
        "huge": (-1e39, 1e39),
        "infinite": (-math.inf, math.inf),
    }[ends]
    sums, kept, kept_w = kernels.bracket_pass(r, u, v, float(lo), float(hi), {})
    r64, uv64, q64 = r.astype(np.float64), np.abs(uv).astype(np.float64), ratio.astype(np.float64)
    nonzero = uv != 0
    below, above = nonzero & (q64 < lo), nonzero & (q64 > hi)
    inside = nonzero & ~below & ~above
    assert np.array_equal(np.sort(kept), np.sort(ratio[inside]))
    assert np.array_equal(np.sort(kept_w), np.sort(np.abs(uv[inside])))
    signed = r64 * np.sign(uv)
    exact = (
        uv64[below].sum(),
        signed[below].sum(),
        uv64[above].sum(),
        signed[above].sum(),
        np.abs(r64[~nonzero]).sum(),
    )
    scale = np.abs(r64).sum() + uv64.sum()
    assert np.allclose(sums, exact, rtol=0, atol=1e-12 * scale)


def _two_candidates(use_kernel: bool, case, seed: int):
    """(B, A, us, vs): the case's factors and two random float32 candidates a side, a fifth of u's entries
    zero (zero weights count |R| and add nothing to the slope); skips the kernel's run without numba."""
    if use_kernel and not kernels.available:
        pytest.skip("numba is not available")
    b, a, _ = case
    rng = np.random.default_rng(seed)
    us = torch.tensor(rng.standard_normal((b.shape[0], 2))).float()
    vs = torch.tensor(rng.standard_normal((a.shape[1], 2))).float()
    us[rng.random(b.shape[0]) < 0.2] = 0
    return b, a, us, vs


@pytest.mark.parametrize("use_kernel", [False, True])
@settings(max_examples=examples(25), deadline=None)
@given(lora_factors(max_dim=40), st.integers(0, 2**32 - 1), st.integers(1, 400), st.integers(0, 2000))
def test_early_tangents_are_those_of_their_own_pass(use_kernel, case, seed, chunk, cache):
    """Tangents summed in the pass of the dual sums and the first exact pair (``_screened``'s early pairs) are
    bit for bit those of a pass of their own over the same residual: at the second step, where the chunks kept
    owe the first pick until that pass subtracts it, and the others are formed again."""
    b, a, us, vs = _two_candidates(use_kernel, case, seed)
    pairs, first = [(0, 1), (1, 0), (1, 1)], [(0, 0)]
    points = {pair: (-0.5 - k, 0.25 + k) for k, pair in enumerate(pairs)}
    found = []
    for early in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(owner("KERNEL_MIN_ENTRIES"), "KERNEL_MIN_ENTRIES", 0 if use_kernel else 1 << 62)
            mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", chunk)
            mp.setattr(owner("CACHE_ENTRIES"), "CACHE_ENTRIES", cache)
            residual = Residual(b.float(), a.T.float())
            fit_state = state.FitState(us, vs, seed)
            exact.exact_pairs(residual, us, vs, first, fit_state, riders=(bounds.DualSums(vs, (0,)),))
            residual = residual.deflate(0.75, us[:, 0], vs[:, 1])
            if early:
                probes = tangents.TangentPass(us, vs, pairs, points)
                exact.exact_pairs(residual, us, vs, first, fit_state, riders=(bounds.DualSums(vs, (0,)), probes))
                found.append(probes.finish())
            else:
                exact.exact_pairs(residual, us, vs, first, fit_state, riders=(bounds.DualSums(vs, (0,)),))
                found.append(tangents_of(residual, us, vs, pairs, points))
    assert found[0] == found[1]
    assert all(len(found[0][pair]) == 2 for pair in pairs)


@pytest.mark.parametrize("use_kernel", [False, True])
@settings(max_examples=examples(40), deadline=None)
@given(
    lora_factors(max_dim=40),
    st.integers(0, 2**32 - 1),
    st.floats(-3, 3),
    st.floats(0, 3),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_tangent_rounding_is_within_its_bound(use_kernel, case, seed, centre, width, single):
    """A tangent from a float32 pass is within its err of the exact one on the same float32 residual: the
    value f(theta) = sum |R - theta u v^T|, and the slope (to err / (2 max |theta|), or its own rounding)
    within the range of subgradients at theta. This is what keeps the tangent bounds certified. Pairs
    asked for one point only share the kernel's two-probe slots with other pairs."""
    b, a, us, vs = _two_candidates(use_kernel, case, seed)
    pairs = [(0, 0), (1, 1), (0, 1), (1, 0)]
    scale = float((b @ a).abs().max() / (us.abs().max() * vs.abs().max() + 1e-30)) + 1e-12
    points = {
        pair: ((centre + width) * scale,) if one else ((centre - width) * scale, (centre + width) * scale)
        for pair, one in zip(pairs, single, strict=True)
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner("KERNEL_MIN_ENTRIES"), "KERNEL_MIN_ENTRIES", 0 if use_kernel else 1 << 62)
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", 37)
        residual = Residual(b.float(), a.T.float())
        found = tangents_of(residual, us, vs, pairs, points)
        r = torch.cat([chunk for _, chunk in residual.chunks()]).double()  # the values the pass saw
    for a_, b_ in pairs:
        assert [t.theta for t in found[a_, b_]] == [float(torch.tensor(x).float()) for x in points[a_, b_]]
        c = us[:, a_].double()[:, None] * vs[:, b_].double()[None, :]
        theta_max = max(abs(t.theta) for t in found[a_, b_])
        for t in found[a_, b_]:
            e = r - t.theta * c
            assert abs(t.f - float(e.abs().sum())) <= t.err
            # an e within the float32 pass's rounding of 0 (4 eps of its terms) may take either sign there
            tied = e.abs() <= 4 * torch.finfo(torch.float32).eps * (r.abs() + abs(t.theta) * c.abs())
            g_mid = float(-(c * e.sign() * ~tied).sum())
            g_free = float((c.abs() * tied).sum())
            g_err = max(
                t.err / (2 * theta_max) if theta_max > 0 else 0.0,
                2 * (kernels.SUM_BLOCK + 4) * torch.finfo(torch.float32).eps * float(c.abs().sum()),
            )
            assert g_mid - g_free - g_err <= t.g <= g_mid + g_free + g_err


@pytest.mark.parametrize("use_kernel", [False, True])
@settings(max_examples=examples(40), deadline=None)
@given(lora_factors(max_dim=40), st.integers(0, 2**32 - 1), st.floats(0, 3))
def test_zero_tangent_is_within_its_bound(use_kernel, case, seed, theta_max):
    """The tangent at delta = 0 that the dual sums give for free: its value within err of ||R||_1 and its
    slope within err / (2 theta_max) (or the sums' own rounding) of a subgradient at 0, on the float32
    residual the pass saw (zeros in R may take either sign); so it is a lower bound of every objective."""
    b, a, us, vs = _two_candidates(use_kernel, case, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner("KERNEL_MIN_ENTRIES"), "KERNEL_MIN_ENTRIES", 0 if use_kernel else 1 << 62)
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", 37)
        residual, sums = Residual(b.float(), a.T.float()), bounds.DualSums(vs)
        read_pass(residual, [sums])
        sums = sums.finish(state.FitState(us, vs, seed))
        r = torch.cat([chunk for _, chunk in residual.chunks()]).double()
    scale = float(r.abs().max() / (us.abs().max() * vs.abs().max() + 1e-30))
    for pair in [(0, 0), (1, 1), (0, 1)]:
        t = tangents.zero_tangent(sums, pair, theta_max * scale)
        c = us[:, pair[0]].double()[:, None] * vs[:, pair[1]].double()[None, :]
        assert t.theta == 0.0
        assert abs(t.f - float(r.abs().sum())) <= t.err
        g_mid, g_free = float(-(c * r.sign()).sum()), float((c.abs() * (r == 0)).sum())
        g_err = max(
            t.err / (2 * theta_max * scale) if theta_max * scale > 0 else 0.0,
            (sums.run + 2) * torch.finfo(torch.float32).eps * float(c.abs().sum()),
        )
        assert g_mid - g_free - g_err <= t.g <= g_mid + g_free + g_err
        for y in np.linspace(-theta_max * scale, theta_max * scale, 5):
            assert t.f + t.g * y - 3 * t.err <= float((r - y * c).abs().sum()) * (1 + 1e-12)


@pytest.mark.parametrize("use_kernel", [False, True])
@settings(max_examples=examples(40), deadline=None)
@given(lora_factors(), st.integers(0, 2**32 - 1), st.floats(-3, 3), st.floats(0, 3))
def test_tangent_bounds_are_lower_bounds(use_kernel, case, seed, centre, width):
    """Whatever bracket it is given, a tangent bound never exceeds the pair's exact objective nor the upper
    bound falls below it, and the lower bound is finite whenever the bracket holds the weighted median
    (float32, as the L1 fit runs)."""
    if use_kernel and not kernels.available:
        pytest.skip("numba is not available")
    b, a, _ = case
    rng = np.random.default_rng(seed)
    us = torch.tensor(np.linalg.qr(rng.standard_normal((b.shape[0], min(3, b.shape[0]))))[0])
    vs = torch.tensor(np.linalg.qr(rng.standard_normal((a.shape[1], min(3, a.shape[1]))))[0])
    R = (b @ a).numpy()
    pairs = [(i, j) for i in range(us.shape[1]) for j in range(vs.shape[1])]
    exact, medians = {}, {}
    for i, j in pairs:
        uv = np.outer(us[:, i].numpy(), vs[:, j].numpy())
        nz = uv != 0
        medians[i, j] = weighted_lower_median(R[nz] / uv[nz], np.abs(uv[nz])) if nz.any() else 0.0
        exact[i, j] = np.abs(R - medians[i, j] * uv).sum()
    scale = max(abs(m) for m in medians.values()) + 1e-12
    brackets = {
        (i, j): (medians[i, j] + (centre - width) * scale, medians[i, j] + (centre + width) * scale) for i, j in pairs
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner("KERNEL_MIN_ENTRIES"), "KERNEL_MIN_ENTRIES", 0 if use_kernel else 1 << 62)
        mp.setattr(owner("CHUNK_ENTRIES"), "CHUNK_ENTRIES", 7)
        residual = Residual(b.float(), a.T.float())
        tangents = tangents_of(residual, us.float(), vs.float(), pairs, brackets)
        # a second round in a narrowed bracket, as the screening does
        first = {pair: envelope_bounds(tangents[pair]) for pair in pairs}
        narrowed = {pair: narrowed_bracket(tangents[pair], first[pair][2]) for pair in pairs}
        for pair, found in tangents_of(residual, us.float(), vs.float(), pairs, narrowed).items():
            tangents[pair] += found
    for pair in pairs:
        tol = 1e-5 * exact[pair] + 1e-5 * np.abs(R).sum() + 1e-30
        for found in (tangents[pair][:2], tangents[pair]):
            lower, upper, known = envelope_bounds(found)
            assert lower <= exact[pair] + tol
            assert upper >= exact[pair] - tol
            if known is not None:
                assert known[0] - 1e-6 * (1 + abs(known[0])) <= medians[pair] <= known[1] + 1e-6 * (1 + abs(known[1]))
        lo, hi = brackets[pair]
        mtol = 1e-5 * abs(medians[pair]) + 1e-6
        if lo < medians[pair] - mtol and hi > medians[pair] + mtol:
            assert envelope_bounds(tangents[pair][:2])[0] > -math.inf


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 4)), min_size=1, max_size=40), st.floats(0.01, 0.99))
def test_weighted_select_is_the_lower_weighted_median(items, fraction):
    """The compiled selection against the literal rule, on ratios with many ties and zero weights."""
    ratios = np.array([float(x) for x, _ in items], dtype=np.float32)
    weights = np.array([float(w) for _, w in items], dtype=np.float32)
    assume(weights.sum() > 0)
    half = fraction * float(weights.sum())
    order = np.argsort(ratios, kind="stable")
    cum = np.cumsum(weights[order].astype(np.float64))
    expected = float(ratios[order][np.searchsorted(cum, half)])
    delta, spread = kernels.weighted_select(ratios.copy(), weights.copy(), half)
    assert delta == expected
    assert spread == pytest.approx(float((weights.astype(np.float64) * np.abs(ratios - expected)).sum()))


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(150), deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(49, 6000),
    st.sampled_from(["normal", "ties", "sorted", "reversed", "constant", "cauchy"]),
    st.sampled_from(["uniform", "integers", "heavy", "mostly-zero"]),
    st.floats(0.0, 1.0),
    st.sampled_from([np.float32, np.float64]),
)
def test_weighted_select_past_its_sorted_tail(seed, n, values, weighting, fraction, dtype):
    """The selection's sampled pivot rounds (taken above SELECT_SMALL entries) against the literal rule: ties,
    sorted input, one repeated value, heavy-tailed and mostly-zero weights, fractions down to 0 and up to 1."""
    rng = np.random.default_rng(seed)
    ratios = {
        "normal": rng.standard_normal(n),
        "ties": rng.integers(-3, 4, n).astype(float),
        "sorted": np.sort(rng.standard_normal(n)),
        "reversed": -np.sort(rng.standard_normal(n)),
        "constant": np.full(n, 1.5),
        "cauchy": rng.standard_cauchy(n),
    }[values].astype(dtype)
    weights = {
        "uniform": rng.uniform(0, 1, n),
        "integers": rng.integers(0, 4, n).astype(float),
        "heavy": np.abs(rng.standard_cauchy(n)),
        "mostly-zero": rng.uniform(0, 1, n) * (rng.uniform(0, 1, n) < 0.02),
    }[weighting].astype(dtype)
    total = float(weights.astype(np.float64).sum())
    assume(total > 0)
    half = fraction * total
    order = np.argsort(ratios, kind="stable")
    cum = np.cumsum(weights[order].astype(np.float64))
    delta, spread = kernels.weighted_select(ratios.copy(), weights.copy(), half)
    # the rule: the first entry whose cumulative weight reaches half; where a cumulative weight is within
    # rounding of half, summing in another order may pick its neighbour, or (at half = the total) find none
    tol = 1e-12 * total
    first, last = int(np.searchsorted(cum, half - tol)), int(np.searchsorted(cum, half + tol))
    if math.isnan(delta):
        assert last == n
        return
    allowed = ratios[order][first : last + 1]
    assert delta in allowed
    exact_spread = (weights.astype(np.float64) * np.abs(ratios.astype(np.float64) - delta)).sum()
    assert spread == pytest.approx(float(exact_spread))


@pytest.mark.parametrize("path", ["kernel", "fallback", "sort"])
@settings(max_examples=examples(60), deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 4)), min_size=7, max_size=7), min_size=1, max_size=6
    ),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_weighted_medians_of_rows(path, rows, dtype):
    """Every row's lower weighted median at half its total weight (0 for a row of zero weights): the parallel
    selection, its fallback to sorting (taken where rounding leaves a row's total a hair above the kernel's
    own sum), and the sort used without numba or off the CPU."""
    if path != "sort" and not kernels.available:
        pytest.skip("numba is not available")
    ratio = torch.tensor([[float(x) for x, _ in row] for row in rows], dtype=dtype)
    w = torch.tensor([[float(y) for _, y in row] for row in rows], dtype=dtype)
    with pytest.MonkeyPatch.context() as mp:
        if path == "fallback":
            mp.setattr(kernels, "weighted_select_rows", lambda r, _w, _h: np.full(r.shape[0], np.nan))
        if path == "sort":
            mp.setattr(kernels, "available", False)
        found = exact.weighted_medians(ratio, w)
    assert found.shape == (len(rows), 1)
    for k in range(len(rows)):
        total = float(w[k].sum())
        expected = weighted_lower_median(ratio[k].numpy(), w[k].numpy()) if total > 0 else 0.0
        assert float(found[k, 0]) == expected


@settings(max_examples=examples(60), deadline=None)
@given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=50),
    st.data(),
    st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_order_statistics_of_the_brackets(values, data, dtype):
    """The k-th smallest entries that bound a sampled bracket: a partial sort on the CPU (float32 / float64),
    kthvalue otherwise (float16 here), both equal to sorting."""
    x = torch.tensor(values, dtype=dtype)
    k_lo = data.draw(st.integers(0, len(values) - 1))
    k_hi = data.draw(st.integers(k_lo, len(values) - 1))
    ordered = sorted(values)
    assert exact.order_statistics(x, k_lo, k_hi) == (ordered[k_lo], ordered[k_hi])


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(40), deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.sampled_from([np.float32, np.float64]), st.booleans())
def test_sampled_brackets_are_order_statistics(seed, n, dtype, ties):
    """The compiled brackets: for each pair, the k_lo-th and k_hi-th smallest of its sampled ratios
    (p[i] . q[j]) / (u_i v_j), as sorting them gives (with many equal ratios too)."""
    rng = np.random.default_rng(seed)
    d, k, s = 9, 7, 3
    p, q = rng.standard_normal((d, s)).astype(dtype), rng.standard_normal((k, s)).astype(dtype)
    if ties:
        p, q = np.round(p), np.round(q)
    us, vs = rng.choice([-2.0, 1.0, 0.5], (d, 2)).astype(dtype), rng.choice([-1.0, 4.0], (k, 3)).astype(dtype)
    rows, cols = rng.integers(0, d, (2, n)), rng.integers(0, k, (3, n))
    table = np.array([(a, b, *sorted(rng.integers(0, n, 2))) for a in range(2) for b in range(3)], dtype=np.int64)
    ends = kernels.sample_brackets(p, q, us, vs, rows, cols, table)
    for (a, b, k_lo, k_hi), (lo, hi) in zip(table, ends, strict=True):
        i, j = rows[a], cols[b]
        ratios = np.sort((p[i] * q[j]).sum(1, dtype=dtype) / (us[i, a] * vs[j, b]))
        assert (lo, hi) == (ratios[k_lo], ratios[k_hi])


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(60), deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 0.5, 1e-30, 3.0e5]), min_size=1, max_size=40).filter(any),
    st.lists(st.floats(0, 1), min_size=1, max_size=50),
    st.booleans(),
)
def test_weighted_draws_are_those_of_a_binary_search(weights, fractions, on_edges):
    """The draws' indices from the guide table are those of searchsorted (the first cumulative weight above the
    draw, the last index past the end), with zero weights (never drawn below the total), equal cumulative sums,
    and draws on them exactly."""
    cdf = torch.tensor(weights, dtype=torch.float64).cumsum(0)
    draws = torch.tensor(fractions, dtype=torch.float64) * cdf[-1]
    if on_edges:
        draws = torch.cat([draws, cdf, torch.zeros(1, dtype=torch.float64)])
    expected = torch.searchsorted(cdf, draws, right=True).clamp(max=cdf.numel() - 1)
    assert kernels.inverse_cdf(cdf.numpy(), draws.numpy()).tolist() == expected.tolist()
    inside = draws[draws < cdf[-1]]  # torch.rand draws from [0, 1)
    assert all(weights[i] > 0 for i in kernels.inverse_cdf(cdf.numpy(), inside.numpy()))


# ---------------------------------------------------------------------------------------------- edge cases


def test_all_zero_update_has_ssi_zero():
    b, a = torch.zeros(5, 3), torch.randn(3, 4)
    for method in Method:
        s = mas_svd(b, a, method=method)
        assert s.ssi == 0.0
        assert all(x == 0 for x in s.sigma)


def test_rank_deficient_update_uses_only_unique_directions():
    b = torch.randn(6, 1, dtype=torch.float64).repeat(1, 4)  # rank 1, r = 4
    a = torch.randn(4, 5, dtype=torch.float64)
    s = mas_svd(b, a)
    assert s.candidates == (1, 1)
    ref = reference((b @ a).numpy(), rank=4)
    assert s.ssi == pytest.approx(ref.ssi, rel=1e-9)


def test_ssi_formula():
    assert ssi(torch.tensor([3.0, 1.0]), 2) == pytest.approx(3.0 / (4.0 + 1e-6))
    assert ssi(torch.tensor([3.0, 1.0, 1.0]), 1) == pytest.approx(3.0 / (3.0 + 1e-6))
    assert ssi(torch.tensor([]), 3) == 0.0


def test_default_components_and_top_h():
    b, a = torch.randn(20, 12, dtype=torch.float64), torch.randn(12, 20, dtype=torch.float64)
    s = mas_svd(b, a)
    assert len(s.picks) == 8 and len(s.sigma) == 8  # M = min(8, r)
    s = mas_svd(b[:, :3], a[:3])
    assert len(s.picks) == 3 and len(s.sigma) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(300, 8, generator=gen), torch.randn(8, 200, generator=gen)
    cpu = mas_svd(b, a)
    gpu = mas_svd(b.cuda(), a.cuda())
    assert [(p.a, p.b) for p in gpu.picks] == [(p.a, p.b) for p in cpu.picks]
    assert math.isclose(gpu.ssi, cpu.ssi, rel_tol=1e-5)


@pytest.mark.parametrize("name", list(ENGINES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_fit_takes_the_lower_weighted_median(name, dtype):
    """R = [1, 2, 3, 4], u = [1], v = [1/2] * 4: ratios 2, 4, 6, 8 with equal weights; the cumulative
    weight reaches exactly half at the second, so delta is 4 (the upper median would be 6)."""
    with engine(name):
        left = torch.tensor([[1.0]], dtype=dtype)
        right = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype)
        us = torch.tensor([[1.0]], dtype=dtype)
        vs = torch.full((4, 1), 0.5, dtype=dtype)
        picks, _, _ = l1_fit(left, right, us, vs, steps=1)
        assert picks[0].delta == 4.0
        assert picks[0].objective == pytest.approx(abs(1 - 2) + abs(2 - 2) + abs(3 - 2) + abs(4 - 2))


# ---------------------------------------------------------------------------------------------- small layers, whole


def _whole_case(b, a, dtype, deflate: bool):
    """A small layer's residual (``residual.Residual``), formed whole, and its candidates in ``dtype``; if ``deflate``,
    after one pick (as the fit deflates it)."""
    us, vs = mas_svd_candidates(b, a, 6)
    us, vs = us.to(dtype), vs.to(dtype)
    res = Residual(b.to(dtype), a.T.contiguous().to(dtype))
    if deflate and us.shape[1] and vs.shape[1]:
        res = res.deflate(0.75 * float((res.p @ res.q.T).abs().max()), us[:, 0], vs[:, 0])
    return res, us, vs


def _step(res, us, vs, exhaustive: bool):
    return kernels.whole_step(
        (res.p @ res.q.T).numpy(),
        us.T.contiguous().numpy(),
        vs.T.contiguous().numpy(),
        BOUND_POWERS,
        exhaustive,
        screening.BOUND_SLACK,
        screening.TINY,
    )


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(lora_factors(max_dim=40, max_rank=6), st.sampled_from([torch.float32, torch.float64]), st.booleans())
def test_whole_step_fits_every_pair_that_can_win(case, dtype, deflate):
    """One compiled step of a small layer against the literal float64 computation over the same residual:
    every pair's bound is a lower bound on its objective; every pair fitted has the literal lower weighted median
    (ratios and products u_i v_j rounded in the compute dtype, as the pass forms them) and objective; a pair is
    left unfitted only where its bound exceeds the best objective by more than BOUND_SLACK; exhaustive fits
    every pair, to the same values; and the winner (``fit.best``) is that of the exhaustive step."""
    res, us, vs = _whole_case(case[0], case[1], dtype, deflate)
    assume(us.shape[1] > 0 and vs.shape[1] > 0)
    deltas, objectives, fitted, lower = _step(res, us, vs, exhaustive=False)
    all_deltas, all_objectives, all_fitted, _ = _step(res, us, vs, exhaustive=True)
    assert all_fitted.all() and fitted.any()
    r = (res.p @ res.q.T).numpy()
    n = r.size
    best = min(float(objectives[pair]) for pair in zip(*fitted.nonzero(), strict=True))
    for a in range(us.shape[1]):
        for b in range(vs.shape[1]):
            uv = np.outer(us[:, a].numpy(), vs[:, b].numpy())  # in the compute dtype, as the pass forms it
            nonzero = uv != 0
            weights = np.abs(uv[nonzero]).astype(np.float64)  # summed in float64, as the pass sums them
            delta = weighted_lower_median(r[nonzero] / uv[nonzero], weights) if nonzero.any() else 0.0
            terms = np.abs(r.astype(np.float64) - delta * uv.astype(np.float64))
            # the float64 sums of n terms, in any order: (n + 2) units of 2^-53 of their magnitudes (each term
            # rounds twice); the bound's sums, three of them, as much again each
            magnitude = float(np.abs(r).sum(dtype=np.float64) + abs(delta) * np.abs(uv).sum(dtype=np.float64))
            tol = (n + 2) * 2.0**-53 * magnitude
            assert all_deltas[a, b] == delta
            assert abs(all_objectives[a, b] - terms.sum()) <= tol
            assert lower[a, b] <= terms.sum() + 4 * tol
            if fitted[a, b]:
                assert (deltas[a, b], objectives[a, b]) == (all_deltas[a, b], all_objectives[a, b])
            else:
                assert lower[a, b] > best + screening.BOUND_SLACK * abs(best) + screening.TINY
    if dtype == torch.float64:  # the formula of ``bounds``: its tensor implementation over the same residual
        expected = lower_bounds(res.p, res.q, us, vs)[0].numpy()
        # R formed in float64 chunks there, in one product here: each entry within (s + 2) 2^-53 of sum_l |p_il q_jl|
        size = float((res.p.abs() @ res.q.abs().T).sum())
        tol = 16 * (n + res.p.shape[1] + 2) * 2.0**-53 * size
        assert np.array_equal(np.isfinite(lower), np.isfinite(expected))
        finite = np.isfinite(lower)
        assert np.all(np.abs(lower[finite] - expected[finite]) <= tol)
    screened = {pair: (float(deltas[pair]), float(objectives[pair])) for pair in zip(*fitted.nonzero(), strict=True)}
    every = {pair: (float(all_deltas[pair]), float(all_objectives[pair])) for pair in np.ndindex(*fitted.shape)}
    assert fit.best(res, us, vs, screened) == fit.best(res, us, vs, every)


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
def test_whole_step_rules_out_pairs():
    """On a decaying update (as trained adapters have) the bounds leave most pairs unfitted at the first step."""
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(64, 8, generator=gen) / torch.arange(1, 9)
    a = torch.randn(8, 64, generator=gen)
    res, us, vs = _whole_case(b.double(), a.double(), torch.float32, False)
    _, _, fitted, _ = _step(res, us, vs, exhaustive=False)
    assert fitted.sum() < fitted.size / 4


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@settings(max_examples=examples(100), deadline=None)
@given(
    st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 4)), min_size=1, max_size=120),
    st.sampled_from([np.float32, np.float64]),
)
def test_entries_fit_sorts_where_the_selection_finds_nothing(items, dtype):
    """A pair's fit where rounding has left the total weight it is given a hair above the selection's own sum (here
    far above, so that the selection surely finds nothing): the median is found by sorting, against the weights'
    own sum; the lower weighted median all the same, and its literal objective (entries of zero weight, ratio
    infinite, count |r|)."""
    ratios = np.array([float(x) if w else np.inf for x, w in items], dtype=dtype)
    weights = np.array([float(w) for _, w in items], dtype=dtype)
    assume(weights.sum() > 0)
    uvs = weights.copy()
    r = np.array([float(x) * w for x, w in items], dtype=dtype)
    own = float(weights.sum(dtype=np.float64))
    for total in (own, 3 * own):
        delta, objective = kernels._entries_fit(r, ratios, weights, uvs, total)
        assert delta == weighted_lower_median(ratios[weights > 0], weights[weights > 0].astype(np.float64))
        assert objective == pytest.approx(float(np.abs(r - delta * uvs).sum(dtype=np.float64)), abs=1e-9)
