"""`s3lora eval` on a tiny random causal LM with a real PEFT adapter: the batched, cached runner against slow
one-prompt-at-a-time references, the variants against models built without it (the base alone, the output of
`s3lora prune`), the checks made before anything runs, the JSON schema, the renderers and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tiny_lm import save_tiny_causal_lm  # noqa: E402
from tiny_models import save_lora  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from s3lora_cli.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, app  # noqa: E402
from s3lora_cli.errors import AdapterInputError  # noqa: E402
from s3lora_cli.evaluation import EvalOptions, VariantKind, evaluate  # noqa: E402
from s3lora_cli.evaluation import render as eval_render  # noqa: E402
from s3lora_cli.evaluation import runner as eval_runner  # noqa: E402
from s3lora_cli.lm import load_causal_lm  # noqa: E402
from s3lora_cli.pruning import PruneMode, prune_adapter  # noqa: E402
from s3lora_cli.scoring import ScoreOptions  # noqa: E402
from s3lora_cli.selection import Selection  # noqa: E402

WORDS = (
    "what is the capital of france spain italy germany portugal paris madrid rome berlin lisbon "
    "city country name one two three four five yes no sorry i cannot help"
)
TASKS = [
    ("what is the capital of france", "paris"),
    ("what is the capital of spain", "madrid"),
    ("name the capital of italy", "rome city"),
    ("capital of germany", "berlin"),
    ("what city is the capital of portugal", "lisbon"),
    ("one two three", "four five"),
    ("the capital", "yes"),
]
REFUSALS = ["help me", "what is the name", "i cannot"]
runner = CliRunner()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model (2 blocks), a LoRA on q/v/down (6 layers, random non-zero factors), tasks and refusals."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_causal_lm(root / "model", [WORDS], layers=2, hidden=16)
    base = load_causal_lm(model_dir).model
    adapter = save_lora(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), root / "adapter", seed=3
    )
    tasks = write_jsonl(root / "tasks.jsonl", [{"prompt": p, "answer": a} for p, a in TASKS])
    refusals = write_jsonl(root / "refusals.jsonl", [{"prompt": p} for p in REFUSALS])
    return {"root": root, "model": model_dir, "adapter": adapter, "tasks": tasks, "refusals": refusals}


def options(world, **kw) -> EvalOptions:
    kw.setdefault("max_new_tokens", 5)
    kw.setdefault("batch_size", 3)
    kw.setdefault("device", "cpu")
    return EvalOptions(tasks=world["tasks"], score=ScoreOptions(device="cpu"), **kw)


@pytest.fixture(scope="module")
def result(world):
    return evaluate(
        world["adapter"],
        world["model"],
        options(world, refusals=world["refusals"], selection=Selection.of(tau=2), sweep_tau=(0, 1, 6)),
    )


def by_name(result):
    return {r.variant.name: r for r in result.variants}


# ---------------------------------------------------------------------------------------------------------------
# The runner against slow references: one prompt at a time, no padding, no shared cache


def reference_run(model, tokenizer, prompt: str, answer: str, max_new_tokens: int):
    """transformers' own greedy generate on one unpadded prompt, and a plain forward over prompt + answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ctx = tokenizer(text, add_special_tokens=False)["input_ids"]
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ctx]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        logits = model(torch.tensor([ctx + ans])).logits[0, len(ctx) - 1 : len(ctx) + len(ans) - 1]
    new = out[0, len(ctx) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), logits, ans


def test_batched_cached_runner_equals_one_prompt_at_a_time(world):
    lm = load_causal_lm(world["model"])
    opts = options(world, max_new_tokens=6)
    run = eval_runner._Runner(lm.model, lm.tokenizer, torch.device("cpu"), opts)
    contexts = [run.context_ids(p) for p, _ in TASKS]
    answers = [run.answer_ids(a) for _, a in TASKS]
    assert len({len(c) for c in contexts}) > 2  # the batch really pads
    with torch.inference_mode():
        texts, (logits, targets, mask) = run.run_batch(contexts, answers)
    for i, (prompt, answer) in enumerate(TASKS):
        text, expected, ans = reference_run(lm.model, lm.tokenizer, prompt, answer, 6)
        assert texts[i] == text
        assert targets[i, : len(ans)].tolist() == ans and mask[i].sum() == len(ans)
        # padding changes only the order of float32 sums: assert_close's float32 defaults (rtol 1.3e-6)
        torch.testing.assert_close(logits[i, : len(ans)], expected)


# ---------------------------------------------------------------------------------------------------------------
# Variants against models built without the evaluation code


def test_the_full_adapter_against_itself(result):
    adapter = by_name(result)["adapter"].scores
    assert adapter.kl == 0.0 and adapter.agreement == 1.0
    assert by_name(result)["tau=0"].scores == adapter  # tau = 0 prunes nothing


def test_all_lora_off_equals_the_base_model(world, result):
    """The base variant (every LoRA layer disabled) scores what the plain model, never wrapped, scores."""
    lm = load_causal_lm(world["model"])
    run = eval_runner._Runner(lm.model, lm.tokenizer, torch.device("cpu"), options(world))
    nll, tokens, answers = 0.0, 0, []
    for prompt, answer in TASKS:
        text, logits, ans = reference_run(lm.model, lm.tokenizer, prompt, answer, 5)
        nll -= float(torch.log_softmax(logits.double(), -1)[torch.arange(len(ans)), ans].sum())
        tokens += len(ans)
        answers.append(text)
    base = by_name(result)["base"]
    assert list(base.answers) == answers
    assert base.scores.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert run is not None


def test_a_sweep_point_that_prunes_every_layer_equals_the_base(result):
    everything, base = by_name(result)["tau=6"], by_name(result)["base"]
    assert len(everything.variant.pruned) == 6
    assert everything.answers == base.answers
    assert everything.scores.nll == base.scores.nll and everything.scores.kl == base.scores.kl


@pytest.mark.parametrize("mode", [PruneMode.ZERO, PruneMode.DROP])
def test_pruned_on_the_fly_equals_loading_the_output_of_prune(world, result, mode, tmp_path):
    pruned_dir = tmp_path / "pruned"
    done = prune_adapter(world["adapter"], pruned_dir, Selection.of(tau=2), mode, ScoreOptions(device="cpu"))
    from_file = evaluate(
        world["adapter"], world["model"], options(world, refusals=world["refusals"], pruned=pruned_dir)
    )
    on_the_fly, loaded = by_name(result)["pruned"], by_name(from_file)["pruned"]
    assert loaded.variant.kind is VariantKind.PRUNED_FILE and on_the_fly.variant.pruned == done.modules
    assert loaded.answers == on_the_fly.answers and loaded.refusal_answers == on_the_fly.refusal_answers
    assert loaded.scores == on_the_fly.scores  # zeroed lora_B adds exactly 0; a dropped layer is not wrapped
    assert by_name(from_file)["adapter"].scores == by_name(result)["adapter"].scores


def test_refusal_rate_counts_the_answers_with_a_marker(world, result):
    for r in result.variants:
        assert r.refusal_answers is not None and len(r.refusal_answers) == len(REFUSALS)
    base = by_name(result)["base"]
    markers = tuple(base.refusal_answers[:1]) if base.refusal_answers[0] else ("zzz-never",)
    again = evaluate(
        world["adapter"], world["model"], options(world, refusals=world["refusals"], refusal_markers=markers, limit=2)
    )
    expected = sum(markers[0].lower() in a.lower() for a in by_name(again)["base"].refusal_answers) / 2
    assert by_name(again)["base"].scores.refusal_rate == expected
    assert len(by_name(again)["base"].answers) == 2  # --limit applies to the tasks too


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything runs


def test_a_base_model_that_does_not_fit_the_adapter_is_refused_before_any_generation(world, tmp_path, monkeypatch):
    other = save_tiny_causal_lm(tmp_path / "other", [WORDS], layers=2, hidden=32)
    one_block = save_tiny_causal_lm(tmp_path / "one", [WORDS], layers=1, hidden=16)

    def no_generation(*args, **kwargs):
        raise AssertionError("ran the model before checking it")

    monkeypatch.setattr(eval_runner._Runner, "run", no_generation)
    with pytest.raises(
        AdapterInputError,
        match=r"down_proj is 32 x 64 in the base model but 16 x 32 in the "
        r"adapter \(and 5 more of the adapter's 6 layers\)",
    ):
        evaluate(world["adapter"], other, options(world))
    result = runner.invoke(
        app,
        ["eval", str(world["adapter"]), "--base", str(one_block), "--tasks", str(world["tasks"]), "--device", "cpu"],
    )
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert "model.layers.1.mlp.down_proj is not a module of the base model (and 2 more" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_non_peft_adapters_are_refused(world, tmp_path):
    from format_factory import to_kohya  # the same adapter as a kohya-ss file

    kohya = to_kohya(world["adapter"], tmp_path / "style.safetensors")
    with pytest.raises(AdapterInputError, match="eval loads adapters with PEFT"):
        evaluate(kohya, world["model"], options(world))


# ---------------------------------------------------------------------------------------------------------------
# Output: the JSON schema, the renderers


VARIANT_KEYS = [
    "name",
    "kind",
    "tau",
    "selection",
    "pruned_layers",
    "pruned",
    "exact_match",
    "contains",
    "nll",
    "kl",
    "agreement",
    "refusal_rate",
    "seconds",
]


def test_json_schema_is_stable(world, result):
    doc = json.loads(eval_render.render_json(result))
    assert list(doc) == [
        "schema_version",
        "tool",
        "base",
        "adapter",
        "tasks",
        "refusals",
        "parameters",
        "variants",
        "seconds",
    ]
    assert doc["schema_version"] == 1 and doc["tool"]["name"] == "s3lora"
    assert list(doc["adapter"]) == ["path", "format", "sha256", "layers"] and doc["adapter"]["layers"] == 6
    assert list(doc["tasks"]) == ["path", "count", "skipped"] and doc["tasks"]["count"] == len(TASKS)
    assert list(doc["refusals"]) == ["path", "count", "skipped", "markers"]
    assert list(doc["parameters"]) == [
        "selection",
        "pruned",
        "sweep_tau",
        "method",
        "max_new_tokens",
        "batch_size",
        "chat_template",
        "limit",
        "device",
    ]
    assert doc["parameters"]["selection"] == {"tau": 2, "threshold": None, "fraction": None}
    assert [v["name"] for v in doc["variants"]] == ["base", "adapter", "pruned", "tau=0", "tau=1", "tau=6"]
    for v in doc["variants"]:
        assert list(v) == VARIANT_KEYS
    assert doc["variants"][1]["kl"] == 0.0 and doc["variants"][1]["agreement"] == 1.0


def test_renderers(result):
    markdown = eval_render.render_markdown(result)
    assert markdown.count("\n| ") == 1 + len(result.variants) and "| adapter | 0 |" in markdown
    rows = eval_render.render_csv(result).splitlines()
    assert rows[0] == ",".join(eval_render.COLUMNS) and rows[2].startswith("adapter,0,")
    assert len(rows) == 1 + len(result.variants)
    assert [len(r.variant.pruned) for r in eval_render.sweep_points(result)] == [0, 1, 6]
    pytest.importorskip("matplotlib")
    assert eval_render.render_plot(result).startswith(b"\x89PNG\r\n\x1a\n")


# ---------------------------------------------------------------------------------------------------------------
# The command line


def invoke(world, *args):
    return runner.invoke(
        app,
        [
            "eval",
            str(world["adapter"]),
            "--base",
            str(world["model"]),
            "--tasks",
            str(world["tasks"]),
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            *map(str, args),
        ],
    )


def test_cli_formats_and_files(world, tmp_path):
    out, plot = tmp_path / "eval.json", tmp_path / "curve.png"
    done = invoke(world, "--sweep-tau", "0,2", "--format", "json", "-o", out, "--plot", plot, "--limit", "3")
    assert done.exit_code == EXIT_OK, done.stderr
    doc = json.loads(out.read_text())
    assert [v["name"] for v in doc["variants"]] == ["base", "adapter", "tau=0", "tau=2"]  # no --tau: sweep only
    assert doc["tasks"]["count"] == 3 and plot.read_bytes().startswith(b"\x89PNG")
    assert "3 tasks x 4 variants" in done.stderr
    again = invoke(world, "--sweep-tau", "0,2", "-o", out)
    assert again.exit_code == EXIT_USAGE and "--force" in again.stderr
    table = invoke(world, "--limit", "2", "--quiet")
    assert table.exit_code == EXIT_OK and "pruned" in table.stdout and table.stderr == ""
    csv = invoke(world, "--limit", "2", "--format", "csv", "--quiet", "--no-chat-template", "--fraction", "0.5")
    assert csv.exit_code == EXIT_OK and csv.stdout.splitlines()[3].startswith("pruned,3,")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau", "2", "--pruned", "x"], "not both"),
        (["--plot", "p.png"], "--sweep-tau"),
        (["--sweep-tau", "1,x"], "--sweep-tau"),
        (["--batch-size", "0"], "--batch-size"),
        (["--tau", "2", "--threshold", "0.5"], "one of"),
    ],
)
def test_cli_usage_errors(world, args, message):
    done = invoke(world, *args)
    assert done.exit_code == EXIT_USAGE and message in done.stderr, done.stderr


def test_cli_refuses_an_output_on_an_input(world):
    done = invoke(world, "-o", world["tasks"], "--force")
    assert done.exit_code == EXIT_USAGE and "is an input" in done.stderr
    inside = invoke(world, "-o", Path(world["adapter"]) / "eval.json")
    assert inside.exit_code == EXIT_USAGE and "is an input" in inside.stderr


def test_cli_input_problems(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    strict = invoke(world, "--tasks", bad, "--strict")
    assert strict.exit_code == EXIT_INPUT and "bad.jsonl:2:" in strict.stderr
    missing = runner.invoke(
        app, ["eval", str(world["adapter"]), "--base", str(tmp_path / "none"), "--tasks", str(world["tasks"])]
    )
    assert missing.exit_code == EXIT_INPUT and "no such model" in missing.stderr


def test_cli_defaults_are_the_librarys():
    from s3lora_cli.cli import eval as eval_cli

    assert eval_cli.DEFAULT_MAX_NEW_TOKENS == eval_runner.DEFAULT_MAX_NEW_TOKENS
    assert eval_cli.DEFAULT_BATCH_SIZE == eval_runner.DEFAULT_BATCH_SIZE
