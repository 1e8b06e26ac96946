"""Similarity of weight updates from the factors: against a dense float64 reference that forms every dW, and the
cases with known answers (identical 1, negated -1, different ranks, disjoint modules, zero updates)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from s3lora_cli.similarity import UpdateSet, pairwise_similarity, similarity, update_inner, update_norm


def factors(d: int, k: int, r: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(d, r, generator=gen, dtype=torch.float64),
        torch.randn(r, k, generator=gen, dtype=torch.float64),
    )


def dense_similarity(a: UpdateSet, b: UpdateSet) -> float:
    """The definition, literally: form every dW in float64 with NumPy and take the norm-weighted mean cosine over
    the modules both have with the same shape."""
    num, den = 0.0, 0.0
    for module in sorted(a.modules.keys() & b.modules.keys()):
        w1 = np.asarray(a.modules[module][0]) @ np.asarray(a.modules[module][1])
        w2 = np.asarray(b.modules[module][0]) @ np.asarray(b.modules[module][1])
        if w1.shape != w2.shape:
            continue
        num += float((w1 * w2).sum())
        den += float(np.linalg.norm(w1) * np.linalg.norm(w2))
    return num / den if den > 0 else math.nan


MODULES = ["q", "k", "v", "o"]


@st.composite
def update_sets(draw, n: int):
    """n adapters over a few modules of fixed shapes, each with a random subset of modules and random ranks."""
    shapes = {m: (draw(st.integers(1, 6)), draw(st.integers(1, 6))) for m in MODULES}
    sets = []
    for i in range(n):
        present = draw(st.lists(st.sampled_from(MODULES), min_size=0, max_size=4, unique=True))
        mods = {}
        for m in present:
            r = draw(st.integers(1, 4))
            scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
            mods[m] = factors(*shapes[m], r, draw(st.integers(0, 10_000)) + 97 * i, scale)
        sets.append(UpdateSet(mods))
    return sets


@settings(max_examples=examples(60), deadline=None)
@given(update_sets(4))
def test_pairwise_matches_the_dense_reference(sets):
    queries, keys = sets[:2], sets[1:]
    sim = pairwise_similarity(queries, keys)
    for i, q in enumerate(queries):
        for j, k in enumerate(keys):
            expected = dense_similarity(q, k)
            got = float(sim.cosine[i, j])
            if math.isnan(expected):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(expected, abs=1e-9)
                assert -1.0 <= got <= 1.0


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 5), st.integers(1, 5), st.integers(0, 1000))
def test_inner_and_norm_from_factors(d, k, r1, r2, seed):
    l1, rt1 = factors(d, k, r1, seed)
    l2, rt2 = factors(d, k, r2, seed + 1)
    w1, w2 = (l1 @ rt1).numpy(), (l2 @ rt2).numpy()
    assert float(update_inner(l1, rt1, l2, rt2)) == pytest.approx(float((w1 * w2).sum()), rel=1e-10, abs=1e-10)
    assert float(update_norm(l1, rt1)) == pytest.approx(float(np.linalg.norm(w1)), rel=1e-10)


def test_identical_is_one_and_negated_is_minus_one():
    a = UpdateSet({"q": factors(8, 6, 3, 1), "v": factors(4, 6, 3, 2)})
    negated = UpdateSet({m: (-left, right) for m, (left, right) in a.modules.items()})
    assert similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    assert similarity(a, negated) == pytest.approx(-1.0, abs=1e-12)


def test_different_ranks_same_update():
    """The same dW written with rank 2 and with rank 5 (three extra zero directions): similarity 1."""
    left, right = factors(6, 5, 2, 3)
    padded = (
        torch.cat([left, torch.zeros(6, 3, dtype=torch.float64)], dim=1),
        torch.cat([right, torch.randn(3, 5, dtype=torch.float64)], dim=0),
    )
    assert similarity(UpdateSet({"q": (left, right)}), UpdateSet({"q": padded})) == pytest.approx(1.0, abs=1e-12)


def test_disjoint_modules_and_other_shapes_are_undefined():
    a = UpdateSet({"q": factors(4, 4, 2, 1)})
    b = UpdateSet({"v": factors(4, 4, 2, 2)})
    other_shape = UpdateSet({"q": factors(5, 4, 2, 3)})
    sim = pairwise_similarity([a], [b, other_shape])
    assert math.isnan(float(sim.cosine[0, 0])) and math.isnan(float(sim.cosine[0, 1]))
    assert sim.shared.tolist() == [[0, 0]]


def test_zero_update_is_undefined_and_weightless():
    zero = UpdateSet({"q": (torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))})
    a = UpdateSet({"q": factors(4, 3, 2, 1)})
    assert math.isnan(similarity(zero, a))
    # a zero module next to a non-zero one does not dilute the mean
    both = UpdateSet({**a.modules, "v": zero.modules["q"]})
    other = UpdateSet({**a.modules, "v": factors(4, 3, 2, 9)})
    assert similarity(both, other) == pytest.approx(1.0, abs=1e-12)


def test_norm_weighted_mean_over_modules():
    """One module identical, one negated: the mean is weighted by ||dW1|| ||dW2|| per module."""
    q, v = factors(4, 4, 2, 1), factors(4, 4, 2, 2, scale=3.0)
    a = UpdateSet({"q": q, "v": v})
    b = UpdateSet({"q": q, "v": (-v[0], v[1])})
    nq, nv = float(update_norm(*q)) ** 2, float(update_norm(*v)) ** 2
    assert similarity(a, b) == pytest.approx((nq - nv) / (nq + nv), abs=1e-12)
