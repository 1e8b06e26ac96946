"""`s3lora eval`'s pure parts: the metrics against hand-computed values, the tasks reader's bad lines, the sweep
option, and the variants it plans against the layers `s3lora prune` selects."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_factory import write_adapter
from hypothesis import given
from hypothesis import strategies as st

from s3lora_cli.errors import AdapterInputError, UsageError
from s3lora_cli.evaluation.metrics import (
    TokenSums,
    contains_match,
    exact_match,
    is_refusal,
    normalize_answer,
    scores,
    token_sums,
)
from s3lora_cli.evaluation.tasks import DEFAULT_REFUSAL_MARKERS, read_markers, read_tasks
from s3lora_cli.evaluation.variants import Variant, VariantKind, parse_sweep, plan_variants
from s3lora_cli.pruning import prune_adapter
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.selection import Selection


def test_answer_matching():
    assert normalize_answer("  The capital is\tPARIS. ") == "the capital is paris"
    assert exact_match("Paris.", "paris") and exact_match("paris", " Paris ")
    assert not exact_match("The capital is Paris.", "Paris")
    assert contains_match("The capital is Paris.", "Paris")
    assert contains_match("New York!", "new york")
    assert not contains_match("It is 100.", "10")  # word boundaries, not substrings
    assert not contains_match("Parisian", "Paris")


def test_refusal_markers():
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.", DEFAULT_REFUSAL_MARKERS)
    assert is_refusal("As an AI language model, I must decline.", DEFAULT_REFUSAL_MARKERS)
    assert not is_refusal("Sure! Here is a recipe for bread.", DEFAULT_REFUSAL_MARKERS)
    assert is_refusal("NO WAY", ["no way"])


def test_token_sums_against_hand_computed_values():
    # position 1: p = softmax(0, 0, 0) = 1/3 each, q = softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4), target 0
    # position 2: p = softmax(0, 1, 0), q = softmax(0, 0, 2), target 1; position 3 is padding (masked)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, -9.0, 3.0]]])
    reference = torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 5.0, 0.0]]])
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[True, True, False]])
    got = token_sums(logits, reference, targets, mask)
    e = math.e
    p2 = [1 / (2 + e), e / (2 + e), 1 / (2 + e)]
    q2 = [1 / (2 + e * e), 1 / (2 + e * e), e * e / (2 + e * e)]
    kl1 = 0.5 * math.log(0.5 / (1 / 3)) + 2 * 0.25 * math.log(0.25 / (1 / 3))
    kl2 = sum(q * math.log(q / p) for q, p in zip(q2, p2, strict=True))
    assert got.tokens == 2
    assert got.nll == pytest.approx(math.log(3) + (math.log(2 + e) - 1), rel=1e-12)
    assert got.kl == pytest.approx(kl1 + kl2, rel=1e-6)  # logits are float32: log-softmax to ~1e-7 relative
    assert got.agree == 1  # position 1: both argmax 0 (first of the tied maxima); position 2: 1 vs 2


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_a_variant_against_itself_has_kl_zero_and_agreement_one(batch, length, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 5
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    got = token_sums(logits, logits, targets, mask)
    assert got.kl == 0.0 and got.agree == got.tokens == int(mask.sum())


def test_scores_aggregate_shares_and_means():
    sums = TokenSums(4, 2.0, 0.4, 3) + TokenSums(1, 1.0, 0.1, 1)
    s = scores(
        ["Paris", "It is Rome.", "x"], ["paris", "rome", "madrid"], sums, ["I'm sorry", "Sure"], DEFAULT_REFUSAL_MARKERS
    )
    assert (s.exact_match, s.contains) == (1 / 3, 2 / 3)
    assert (s.nll, s.kl, s.agreement, s.refusal_rate) == (3.0 / 5, 0.5 / 5, 4 / 5, 0.5)
    assert scores(["a"], ["a"], TokenSums(1), None, DEFAULT_REFUSAL_MARKERS).refusal_rate is None


def test_tasks_file_bad_lines_are_skipped_with_their_numbers(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"prompt": "a?", "answer": "A"}\n\nnot json\n[1, 2]\n{"prompt": "b?"}\n'
        '{"prompt": "c?", "answer": "C", "extra": 1}\n{"prompt": "", "answer": "D"}\n'
    )
    got = read_tasks(path)
    assert [(t.prompt, t.answer, t.line) for t in got.tasks] == [("a?", "A", 1), ("c?", "C", 6)]
    assert [b.line for b in got.skipped] == [3, 4, 5, 7]
    assert "not valid JSON" in got.skipped[0].reason and "answer" in got.skipped[2].reason
    with pytest.raises(AdapterInputError, match=r"tasks\.jsonl:3: not valid JSON"):
        read_tasks(path, strict=True)
    assert [t.line for t in read_tasks(path, limit=1).tasks] == [1]
    assert [t.answer for t in read_tasks(path, need_answer=False).tasks] == [None, None, None]


@pytest.mark.parametrize(
    "text, message", [(None, "no such file"), ("", "no task"), ("oops\n", "no task"), (b"\xff\xfe", "not UTF-8")]
)
def test_unusable_tasks_files(tmp_path, text, message):
    path = tmp_path / "tasks.jsonl"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(AdapterInputError, match=message):
        read_tasks(path)


def test_refusal_markers_file(tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text("# one per line\nI refuse\n\n  nope  \n")
    assert read_markers(path) == ("I refuse", "nope")
    path.write_text("# nothing\n")
    with pytest.raises(AdapterInputError, match="no refusal marker"):
        read_markers(path)


def test_parse_sweep():
    assert parse_sweep("0, 2,4,2,10") == (0, 2, 4, 10)
    for bad in ("", "1,,2", "-1", "a", "1.5"):
        with pytest.raises(UsageError, match="--sweep-tau"):
            parse_sweep(bad)


def test_planned_variants_prune_what_prune_selects(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    report = score_adapter(adapter, ScoreOptions(device="cpu"))
    selection = Selection.of(tau=2)
    variants = plan_variants(report, selection, sweep=(0, 1, 3))
    assert [v.name for v in variants] == ["base", "adapter", "pruned", "tau=0", "tau=1", "tau=3"]
    dry = prune_adapter(adapter, tmp_path / "out", selection, options=ScoreOptions(device="cpu"), dry_run=True)
    assert variants[2].pruned == dry.modules and len(dry.modules) == 2
    assert variants[3].pruned == ()  # tau = 0 prunes nothing (prune itself refuses it)
    for variant, tau in zip(variants[4:], (1, 3), strict=True):  # a sweep may take most layers: allowed there
        assert (
            variant.pruned
            == prune_adapter(
                adapter,
                tmp_path / "out",
                Selection.of(tau=tau, allow_large=True),
                options=ScoreOptions(device="cpu"),
                dry_run=True,
            ).modules
        )
    # tau = 0 is the adapter itself, evaluated once
    assert variants[3].same_model_as == variants[1].same_model_as != variants[0].same_model_as
    threshold = plan_variants(report, Selection.of(threshold=0.0, allow_large=True))[2]
    assert len(threshold.pruned) == len(report.layers) and threshold.tau is None
    from_file = plan_variants(None, None, pruned_file=tmp_path / "p")
    assert from_file[2] == Variant("pruned", VariantKind.PRUNED_FILE, selection=str(tmp_path / "p"))
