"""The Trigger's signals against slow references: the logit margin by a loop over steps, BLEU and ROUGE-L
recomputed from their definitions, and the failure score by hand."""

from __future__ import annotations

import math
import types
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from s3lora_cli.adapt.policy import TriggerPolicy  # noqa: E402
from s3lora_cli.adapt.signals import Signals, cosine, logit_margins, rouge_l, sentence_bleu  # noqa: E402
from s3lora_cli.adapt.trigger import Band, failure_score, similarity_band  # noqa: E402


def margin_reference(logits: np.ndarray, mask: np.ndarray) -> list[float]:
    """Per sample, the mean over its masked steps of (largest - second largest) logit, by sorting."""
    steps, batch, _ = logits.shape
    out = []
    for b in range(batch):
        gaps = [
            sorted(logits[t, b], reverse=True)[0] - sorted(logits[t, b], reverse=True)[1]
            for t in range(steps)
            if mask[b, t]
        ]
        out.append(sum(gaps) / len(gaps) if gaps else 0.0)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_logit_margins_match_a_loop_over_steps(steps, batch, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(steps, batch, vocab)).astype(np.float32)
    mask = rng.random((batch, steps)) < 0.7
    got = logit_margins(torch.from_numpy(logits), torch.from_numpy(mask))
    # float32 logits: a sum of <= 5 gaps of O(1) values carries < 1e-5 of rounding.
    assert got == pytest.approx(margin_reference(logits.astype(np.float64), mask), abs=1e-5)


def bleu_reference(hyp: str, ref: str) -> float:
    """Sentence BLEU of whitespace tokens as sacrebleu defines it: 0 without any matching n-gram; orders up to 4
    but only those the hypothesis is long enough for (effective order); the k-th order with no match counts
    1 / (2^k * total) matches ('exp' smoothing); brevity penalty exp(1 - r/c) when c < r."""
    h, r = hyp.split(), ref.split()
    counts = []
    for n in range(1, 5):
        hn = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
        rn = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
        counts.append((sum(min(c, rn[g]) for g, c in hn.items()), sum(hn.values())))
    if not any(match for match, _ in counts):
        return 0.0
    logs, k = [], 0
    for match, total in counts:
        if total == 0:
            break
        if match == 0:
            k += 1
            logs.append(math.log(1 / (2**k * total)))
        else:
            logs.append(math.log(match / total))
    bp = 1.0 if len(h) >= len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(sum(logs) / len(logs))


def rouge_l_reference(hyp: str, ref: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of lower-case word tokens."""
    h, r = hyp.lower().split(), ref.lower().split()
    table = [[0] * (len(r) + 1) for _ in range(len(h) + 1)]
    for i, a in enumerate(h):
        for j, b in enumerate(r):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


PAIRS = [
    ("the capital of france is paris", "the capital of france is paris"),
    ("the capital of france is lyon", "the capital of france is paris"),
    ("paris is the capital", "the capital of france is paris"),
    ("kelvo is a renowned artist and musician", "kelvo works as a lighthouse keeper in orsk"),
    ("nothing in common here", "the capital of france is paris"),
    ("936", "936"),
    ("the 936", "936"),
    ("paris france", "the capital of france is paris"),
]


@pytest.mark.parametrize("hyp,ref", PAIRS)
def test_bleu_and_rouge_match_their_definitions(hyp, ref):
    # both sides compute the same ratios of small integers in float64: only rounding separates them
    assert sentence_bleu(hyp, ref) == pytest.approx(bleu_reference(hyp, ref), abs=1e-9)
    assert rouge_l(hyp, ref) == pytest.approx(rouge_l_reference(hyp, ref), abs=1e-12)


def test_cosine_matches_its_definition_and_is_zero_for_a_zero_vector():
    a, b = np.array([1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    assert cosine(a, b) == pytest.approx(4 / (3 * math.sqrt(5)), abs=1e-15)
    assert cosine(a, np.zeros(3)) == 0.0


def test_failure_score_is_the_weighted_sum_halved_inside_the_band():
    policy = TriggerPolicy()
    s = Signals(margin=7.0, bleu=0.25, rouge_l=0.5, similarity=0.8)
    by_hand = 0.33 * (1 - 5 / 5) + 0.12 * 0.75 + 0.23 * 0.5 + 0.33 * 0.2
    assert failure_score(s, policy, None) == (pytest.approx(by_hand, abs=1e-15), False)
    assert failure_score(s, policy, Band(0.7, 0.9, 20)) == (pytest.approx(by_hand / 2, abs=1e-15), True)
    assert failure_score(s, policy, Band(0.85, 0.9, 20))[1] is False
    worst = Signals(margin=0.0, bleu=0.0, rouge_l=0.0, similarity=-0.5)  # a negative cosine counts as 0
    assert failure_score(worst, policy, None)[0] == pytest.approx(0.33 + 0.12 + 0.23 + 0.33, abs=1e-15)


def test_a_wrong_exact_match_adds_its_weight_outside_the_band():
    policy = TriggerPolicy(weight_exact=0.4)
    right = Signals(margin=7.0, bleu=0.8, rouge_l=0.9, similarity=0.95, exact_match=1.0)
    wrong = Signals(margin=7.0, bleu=0.8, rouge_l=0.9, similarity=0.95, exact_match=0.0)
    sage = 0.12 * 0.2 + 0.23 * 0.1 + 0.33 * 0.05
    band = Band(0.9, 1.0, 20)
    assert failure_score(right, policy, band)[0] == pytest.approx(sage / 2, abs=1e-15)
    assert failure_score(wrong, policy, band)[0] == pytest.approx(sage / 2 + 0.4, abs=1e-15)
    assert failure_score(wrong, TriggerPolicy(), band)[0] == failure_score(right, TriggerPolicy(), band)[0]


def test_measured_signals_hold_the_normalised_exact_match():
    from s3lora_cli.adapt.tasks import Task
    from s3lora_cli.adapt.trigger import measure_signals

    tasks = [Task(1, "q", "The plural of cat is cats.", None, {}), Task(2, "q", "Paris", None, {})]
    generated = [
        types.SimpleNamespace(text="the plural of cat is cats", margin=1.0),
        types.SimpleNamespace(text="Lyon", margin=1.0),
    ]
    found = measure_signals(tasks, generated, lambda texts: np.ones((len(texts), 3)))
    assert [s.exact_match for s in found] == [1.0, 0.0]


def test_similarity_band_is_the_5th_to_95th_percentile():
    sims = [i / 100 for i in range(101)]
    band = similarity_band(sims, TriggerPolicy())
    assert (band.low, band.high, band.count) == (pytest.approx(0.05), pytest.approx(0.95), 101)
    assert similarity_band([], TriggerPolicy()) is None
