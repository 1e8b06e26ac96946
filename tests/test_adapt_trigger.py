"""The Trigger on a tiny random model: generated answers and their margins against a full forward pass, the
warm-up band, and the records in stream order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
import torch  # noqa: E402
from tiny_lm import save_tiny_causal_lm  # noqa: E402

from s3lora_cli.adapt.embedding import mean_pool, model_embedder  # noqa: E402
from s3lora_cli.adapt.policy import TriggerPolicy  # noqa: E402
from s3lora_cli.adapt.tasks import Task  # noqa: E402
from s3lora_cli.adapt.trigger import (  # noqa: E402
    format_prompt,
    generate_answers,
    run_trigger,
    similarity_band,
)
from s3lora_cli.lm import load_causal_lm  # noqa: E402

TEXTS = [
    "what is the capital of france the capital of france is paris",
    "spell garden backwards n e d r a g",
    "add two and three five",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_causal_lm(save_tiny_causal_lm(tmp_path_factory.mktemp("model"), texts=TEXTS, layers=2, seed=1))


def task(line: int, prompt: str, answer: str, tag=None) -> Task:
    return Task(line=line, prompt=prompt, answer=answer, tag=tag, record={"prompt": prompt, "answer": answer})


def test_generated_answers_and_margins_match_one_forward_pass_per_sample(lm):
    prompts = ["what is the capital of france", "spell garden", "add two and three five five"]
    answers = generate_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=5)
    eos = lm.tokenizer.eos_token_id
    for prompt, answer in zip(prompts, answers, strict=True):
        # Reference: greedy decoding of the prompt alone (no padding), one full forward pass per step.
        ids = lm.tokenizer(format_prompt(lm.tokenizer, prompt), return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ]
        gaps, new = [], []
        with torch.no_grad():
            for _ in range(5):
                logits = lm.model(ids).logits[0, -1].double()
                top = torch.sort(logits, descending=True).values
                gaps.append(float(top[0] - top[1]))
                token = int(torch.argmax(logits))
                new.append(token)
                if token == eos:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        text = lm.tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True).strip()
        assert answer.text == text
        # float32 logits of O(1) through a batched, left-padded pass: agreement to ~1e-5
        assert answer.margin == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)


def test_mean_pool_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.equal(pooled[0], hidden[0, :2].mean(0)) and torch.equal(pooled[1], hidden[1].mean(0))


def test_the_embedding_of_a_text_does_not_depend_on_its_batch(lm):
    embed = model_embedder(lm, batch_size=4)
    alone = embed(["spell garden backwards"])
    together = embed(["spell garden backwards", "what is the capital of france the capital of france is paris"])
    assert np.allclose(alone[0], together[0], atol=1e-5)


def test_run_trigger_holds_the_warm_up_then_scores_every_sample_in_order(lm):
    tasks = [
        task(i + 1, p, a, tag="t" + str(i % 2))
        for i, (p, a) in enumerate(
            [("what is the capital of france", "the capital of france is paris")] * 3
            + [("spell garden backwards", "n e d r a g")] * 4
        )
    ]
    policy = TriggerPolicy(warmup=3)
    records = list(
        run_trigger(lm.model, lm.tokenizer, tasks, policy, model_embedder(lm), batch_size=2, max_new_tokens=4)
    )
    assert [r.task.line for r in records] == list(range(1, 8))
    assert [r.warmup for r in records] == [True] * 3 + [False] * 4
    band = similarity_band([r.signals.similarity for r in records[:3]], policy)
    for r in records:
        assert r.in_band == (band.low <= r.signals.similarity <= band.high)
        assert r.triggered == (r.score >= policy.threshold)
        doc = r.to_json()
        assert doc["task"] == r.task.record and set(doc["signals"]) == {
            "margin",
            "bleu",
            "rouge_l",
            "similarity",
            "exact_match",
        }


def test_a_stream_shorter_than_the_warm_up_uses_the_band_of_what_there_was(lm):
    tasks = [task(1, "spell garden", "n e d r a g"), task(2, "add two", "five")]
    records = list(run_trigger(lm.model, lm.tokenizer, tasks, TriggerPolicy(warmup=20), model_embedder(lm)))
    assert len(records) == 2 and all(r.warmup for r in records)


def test_an_encoder_directory_embeds_as_its_mean_pooled_last_hidden_state(tmp_path):
    from tiny_lm import tiny_tokenizer
    from transformers import BertConfig, BertModel

    from s3lora_cli.adapt.embedding import load_encoder_embedder

    tokenizer = tiny_tokenizer(TEXTS)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    embed = load_encoder_embedder(tmp_path)
    texts = ["spell garden backwards", "add two and three five five five"]
    got = embed(texts)
    model.eval()
    for text, row in zip(texts, got, strict=True):  # reference: one text at a time, the plain mean over tokens
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).last_hidden_state[0].mean(dim=0).numpy()
        assert np.allclose(row, expected, atol=1e-5)
    assert embed.name == f"embedder:{tmp_path}"
