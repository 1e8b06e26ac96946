"""`s3lora prune`: selection, the pruned adapter's files, safety of the writes, every exit code, and the
result loaded by the real PEFT library (zero and drop modes, DoRA, GPT-2 Conv1D, an encoder)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import types
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from adapter_factory import config_dict, write_adapter
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from tiny_models import lora_modules, peft_delta, save_lora, tiny_bert, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

from s3lora_cli import durable
from s3lora_cli.adapters.writer import REPORT_NAME, merged_exclude_modules
from s3lora_cli.cli import EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, app
from s3lora_cli.errors import AdapterInputError, UsageError
from s3lora_cli.pruning import PruneMode, prune_adapter
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.selection import Selection, above_threshold, select_layers, top_fraction, top_tau
from s3lora_cli.spectral import Method

runner = CliRunner()
SHARP = "model.layers.1.self_attn.v_proj"  # the top layer of adapter_factory's default adapter


def run(*args):
    return runner.invoke(app, ["prune", *(str(a) for a in args)])


def expect(result, code: int, *fragments: str):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path: equal before and after means untouched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as fh:
        return fh.metadata()


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
    )


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    path = write_adapter(tmp_path / "adapter")
    (path / "README.md").write_text("# my adapter\n")
    (path / "tokenizer.json").write_text('{"model": {}}')
    (path / "training").mkdir()
    (path / "training" / "args.json").write_text('{"lr": 0.0001}')
    return path


# ------------------------------------------------------------------------------------------------- selection


def fake_report(ssis):
    """A report stand-in for the policy functions: layers in rank order (None = not scored, ranked last)."""
    layers = [types.SimpleNamespace(module=f"m{i:03d}", ssi=s) for i, s in enumerate(ssis)]
    layers.sort(key=lambda s: (s.ssi is None, -(s.ssi or 0.0), s.module))
    return types.SimpleNamespace(layers=tuple(layers))


def test_selection_needs_exactly_one_rule():
    assert Selection.of() == Selection(tau=10)
    assert Selection.of(threshold=0.45).threshold == 0.45
    with pytest.raises(UsageError, match="not --tau and --threshold"):
        Selection.of(tau=2, threshold=0.5)
    with pytest.raises(UsageError, match="give one of"):
        Selection()
    for bad in (
        {"tau": -1},
        {"threshold": -0.1},
        {"threshold": 1.5},
        {"threshold": math.nan},
        {"fraction": 0.0},
        {"fraction": 1.01},
        {"fraction": math.nan},
    ):
        with pytest.raises(UsageError):
            Selection.of(**bad)


def test_fraction_rounds_up_and_never_to_float_noise():
    assert len(top_fraction(fake_report([0.5] * 30), 0.1)) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert len(top_fraction(fake_report([0.5] * 7), 0.1)) == 1  # ceil: any fraction > 0 prunes one layer
    assert len(top_fraction(fake_report([0.5] * 25), 0.1)) == 3
    assert len(top_fraction(fake_report([0.5] * 4 + [None]), 1.0)) == 4  # unscored layers are never selected


def test_threshold_is_inclusive_and_skips_unscored():
    report = fake_report([0.45, 0.44999, 0.9, None, 0.45])
    assert [s.ssi for s in above_threshold(report, 0.45)] == [0.9, 0.45, 0.45]
    assert above_threshold(report, 1.0) == ()
    assert len(above_threshold(report, 0.0)) == 4


@given(
    st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=40),
    st.floats(0, 1),
    st.integers(0, 50),
    st.floats(1e-6, 1),
)
def test_every_selection_is_a_prefix_of_the_ranking(ssis, threshold, tau, fraction):
    report = fake_report(ssis)
    scored = [s for s in report.layers if s.ssi is not None]
    for chosen in (top_tau(report, tau), above_threshold(report, threshold), top_fraction(report, fraction)):
        assert list(chosen) == scored[: len(chosen)]
    assert len(top_fraction(report, fraction)) == min(len(scored), math.ceil(round(fraction * len(scored), 9)))
    assert all(s.ssi >= threshold for s in above_threshold(report, threshold))
    tau = max(tau, 1)  # prune refuses --tau 0
    assert select_layers(report, Selection(tau=tau, allow_large=True)) == top_tau(report, tau)
    # without allow_large, a tau above the scored layers or a selection of more than half of them is refused
    for selection in (Selection(tau=tau), Selection(threshold=threshold), Selection(fraction=fraction)):
        large = (selection.tau or 0) > len(scored) or len(
            select_layers(report, replace(selection, allow_large=True))
        ) > len(scored) / 2
        if large:
            with pytest.raises(UsageError, match="--allow-large"):
                select_layers(report, selection)
        else:
            assert select_layers(report, selection) == select_layers(report, replace(selection, allow_large=True))


def test_exclude_modules_merge_keeps_the_form_peft_reads():
    assert merged_exclude_modules(None, ["b.q", "a.q"]) == ["a.q", "b.q"]
    assert merged_exclude_modules(["lm_head", "a.q"], ["b.q", "a.q"]) == ["lm_head", "a.q", "b.q"]
    pattern = merged_exclude_modules(r".*\.k_proj", ["model.layers.0.q_proj"])
    assert re.fullmatch(pattern, "model.layers.3.k_proj") and re.fullmatch(pattern, "model.layers.0.q_proj")
    assert not re.fullmatch(pattern, "model.layers.0Xq_proj") and not re.fullmatch(pattern, "model.layers.1.q_proj")
    with pytest.raises(AdapterInputError):
        merged_exclude_modules({"q": 1}, ["a"])


# ---------------------------------------------------------------------------------------- the CLI end to end


def test_default_prunes_top_tau_into_a_sibling(adapter, tmp_path):
    before = tree_hash(adapter)
    result = expect(run(adapter, "--tau", "2"), EXIT_OK, "pruned 2 of 4 scored layers (50 %)", "adapter-pruned")
    out = tmp_path / "adapter-pruned"
    assert str(out) in result.stdout and SHARP in result.stdout
    assert tree_hash(adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter-pruned"]  # no temp left behind
    assert {
        "README.md",
        "tokenizer.json",
        "training/args.json",
        REPORT_NAME,
        "adapter_config.json",
        "adapter_model.safetensors",
    } == set(tree_hash(out))
    for name in ("README.md", "tokenizer.json", "training/args.json", "adapter_config.json"):
        assert tree_hash(out)[name] == before[name]  # copied verbatim; zero mode leaves the config as it was


def test_pruned_modules_are_the_top_tau_of_score(adapter, tmp_path):
    options = ScoreOptions(method=Method.SVD, components=2, top_h=1, device="cpu")
    expected = [s.module for s in top_tau(score_adapter(adapter, options), 3)]
    result = expect(
        run(
            adapter,
            "--tau",
            "3",
            "--method",
            "svd",
            "--components",
            "2",
            "--top-h",
            "1",
            "--device",
            "cpu",
            "--format",
            "json",
            "-q",
            "--allow-large",
        ),
        EXIT_OK,
    )
    doc = json.loads(result.stdout)
    assert result.stderr == ""
    assert [p["module"] for p in doc["pruned"]] == expected
    assert [p["rank"] for p in doc["pruned"]] == [1, 2, 3]
    assert (
        doc["parameters"].items()
        >= {"method": "svd", "components": 2, "top_h": 1, "device": "cpu", "tau": 3, "mode": "zero"}.items()
    )
    assert doc["prune"] == {
        "mode": "zero",
        "selection": {"tau": 3, "threshold": None, "fraction": None},
        "output": str(tmp_path / "adapter-pruned"),
        "written": True,
    }
    assert doc["summary"]["pruned"] == expected
    assert [layer["pruned"] for layer in doc["layers"]] == [True] * 3 + [False]
    written = json.loads((tmp_path / "adapter-pruned" / REPORT_NAME).read_text())
    assert written == doc  # s3lora-report.json is the same document
    assert json.loads(metadata(tmp_path / "adapter-pruned")["s3lora.parameters"])["method"] == "svd"


def test_zero_mode_tensors(tmp_path):
    src = write_adapter(tmp_path / "adapter", dtype=torch.bfloat16)
    out = tmp_path / "pruned"
    doc = json.loads(expect(run(src, "--threshold", "0.5", "-o", out, "-f", "json"), EXIT_OK).stdout)
    pruned = {p["module"] for p in doc["pruned"]}
    assert pruned and all(p["ssi"] >= 0.5 for p in doc["pruned"])
    assert all(layer["ssi"] < 0.5 for layer in doc["layers"] if layer["module"] not in pruned)
    before, after = tensors(src), tensors(out)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        if module in pruned and ".lora_B." in name:
            assert after[name].dtype == torch.bfloat16 and after[name].shape == tensor.shape
            assert not after[name].any()
        else:
            assert same_bits(after[name], tensor), name
    meta = metadata(out)
    assert meta["format"] == "pt" and meta["s3lora.version"] and meta["s3lora.method"] == "mas-svd"
    assert {p["module"] for p in json.loads(meta["s3lora.pruned"])} == pruned
    assert all(p["action"] == "zero" and 0.5 <= p["ssi"] <= 1 for p in json.loads(meta["s3lora.pruned"]))
    assert meta["s3lora.source_sha256"] == doc["adapter"]["sha256"]


def test_drop_mode_keeps_every_config_key(tmp_path):
    cfg = config_dict(exclude_modules=["lm_head"], my_unknown_key={"nested": [1, 2]}, layers_pattern=None)
    src = write_adapter(tmp_path / "adapter", config=cfg)
    out = tmp_path / "pruned"
    doc = json.loads(expect(run(src, "--fraction", "0.5", "--mode", "drop", "-o", out, "-f", "json"), EXIT_OK).stdout)
    dropped = [p["module"] for p in doc["pruned"]]
    assert len(dropped) == 2 and dropped[0] == SHARP and {p["action"] for p in doc["pruned"]} == {"drop"}
    new_cfg = json.loads((out / "adapter_config.json").read_text())
    assert new_cfg == {**cfg, "exclude_modules": ["lm_head", *sorted(dropped)]}
    before, after = tensors(src), tensors(out)
    gone = {n for n in before if n.removeprefix("base_model.model.").split(".lora_")[0] in dropped}
    assert len(gone) == 4 and after.keys() == before.keys() - gone
    assert all(same_bits(after[n], before[n]) for n in after)


def test_drop_of_every_layer_is_refused(adapter, tmp_path):
    expect(
        run(adapter, "--mode", "drop", "--tau", "4", "--allow-large"), EXIT_USAGE, "all 4 LoRA layers", "--mode zero"
    )
    assert not (tmp_path / "adapter-pruned").exists()


def test_dry_run_writes_nothing(adapter, tmp_path):
    before = tree_hash(tmp_path)
    result = expect(run(adapter, "--tau", "1", "--dry-run", "-f", "json"), EXIT_OK, "nothing was written")
    doc = json.loads(result.stdout)
    assert doc["prune"]["written"] is False and [p["module"] for p in doc["pruned"]] == [SHARP]
    assert tree_hash(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    table = expect(run(adapter, "--tau", "1", "--dry-run"), EXIT_OK, "dry run: would prune 1 of 4 scored layers (25 %)")
    assert SHARP in table.stdout and tree_hash(tmp_path) == before


def test_markdown_and_csv(adapter, tmp_path):
    md = expect(run(adapter, "--tau", "1", "-f", "markdown", "--dry-run"), EXIT_OK).stdout
    assert md.startswith("### s3lora") and f"`{SHARP}`" in md
    csv_text = expect(run(adapter, "--tau", "1", "-f", "csv", "--dry-run"), EXIT_OK).stdout
    assert csv_text.splitlines()[0].split(",")[:3] == ["rank", "pruned", "module"]
    assert csv_text.splitlines()[1].split(",")[1:3] == ["yes", SHARP]


def test_weights_file_path_and_bin_input(adapter, tmp_path):
    expect(run(adapter / "adapter_model.safetensors", "--tau", "1", "-q"), EXIT_OK)
    assert (tmp_path / "adapter-pruned" / "adapter_config.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(tensors(adapter), binary / "adapter_model.bin")
    (binary / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    expect(run(binary, "--tau", "1", "-q"), EXIT_OK)
    out = tmp_path / "bin-pruned"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", REPORT_NAME]
    assert not tensors(out)[f"base_model.model.{SHARP}.lora_B.weight"].any()


def test_existing_output_needs_force(adapter, tmp_path):
    out = tmp_path / "pruned"
    expect(run(adapter, "--tau", "1", "-o", out), EXIT_OK)
    (out / "stale.txt").write_text("from an older run")
    before = tree_hash(out)
    expect(run(adapter, "--tau", "2", "-o", out), EXIT_USAGE, "exists", "--force")
    expect(run(adapter, "--tau", "2", "-o", out, "--dry-run"), EXIT_USAGE, "--force")  # fails where the run would
    assert tree_hash(out) == before
    expect(run(adapter, "--tau", "2", "-o", out, "--force"), EXIT_OK)
    assert not (out / "stale.txt").exists() and len(json.loads((out / REPORT_NAME).read_text())["pruned"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "pruned"]


def test_force_never_replaces_something_that_is_not_an_adapter(adapter, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    expect(run(adapter, "-o", precious, "--force"), EXIT_USAGE, "not empty", "adapter_config.json")
    (tmp_path / "file").write_text("x")
    expect(run(adapter, "-o", tmp_path / "file", "--force"), EXIT_USAGE, "not a directory")
    assert (precious / "thesis.tex").read_text() == "years of work" and (tmp_path / "file").read_text() == "x"


def test_output_into_the_input_is_refused(adapter, tmp_path):
    before = tree_hash(tmp_path)
    (tmp_path / "link").symlink_to(adapter, target_is_directory=True)
    expect(run(adapter, "-o", adapter), EXIT_USAGE, "is the input adapter")
    expect(run(adapter, "-o", adapter / "pruned"), EXIT_USAGE, "or inside it")
    expect(run(adapter, "-o", tmp_path / "link", "--force"), EXIT_USAGE, "or inside it", "resolves to")
    expect(run(adapter, "-o", tmp_path / "link" / "sub"), EXIT_USAGE, "or inside it")
    expect(run(tmp_path / "link", "-o", adapter / "x"), EXIT_USAGE, "or inside it")
    expect(run(adapter, "-o", tmp_path, "--force"), EXIT_USAGE, "contains the input")
    (tmp_path / "link").unlink()
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tau", "2", "--threshold", "0.5"], "not --tau and --threshold"),
        (["--fraction", "0.5", "--threshold", "0.5"], "not --threshold and --fraction"),
        (["--fraction", "0"], "--fraction"),
        (["--fraction", "1.5"], "--fraction"),
        (["--threshold", "1.2"], "--threshold"),
        (["--tau", "-1"], "--tau"),
        (["--components", "0"], "--components"),
        (["--device", "tpu"], "--device"),
        (["--mode", "delete"], "--mode"),
    ],
)
def test_usage_errors(adapter, tmp_path, args, fragment):
    expect(run(adapter, *args), EXIT_USAGE, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_input_errors(tmp_path, adapter):
    expect(run(tmp_path / "nowhere"), EXIT_INPUT, "no such file")
    (tmp_path / "empty").mkdir()
    expect(run(tmp_path / "empty"), EXIT_INPUT, "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text("{not json")
    expect(run(adapter), EXIT_INPUT, "not valid JSON")
    assert not (tmp_path / "adapter-pruned").exists() and not (tmp_path / "empty-pruned").exists()


def test_library_returns_data_and_prints_nothing(adapter, tmp_path, capfd):
    result = prune_adapter(adapter, tmp_path / "out", Selection.of(fraction=0.25), PruneMode.ZERO)
    assert capfd.readouterr() == ("", "")
    assert result.written and result.output == tmp_path / "out" and result.modules == (SHARP,)
    assert result.pruned[0].action is PruneMode.ZERO and result.pruned[0].tensors == (
        f"base_model.model.{SHARP}.lora_B.weight",
    )


# --------------------------------------------------------------------------------- nothing lost on a failure


def test_crash_while_saving_leaves_nothing(adapter, tmp_path, monkeypatch):
    from s3lora_cli.adapters.writer import WeightsSource

    def half_written_then_interrupted(self, fh, **kwargs):
        fh.write(b"\x00" * 100)
        raise KeyboardInterrupt

    before = tree_hash(tmp_path)
    monkeypatch.setattr(WeightsSource, "write", half_written_then_interrupted)
    expect(run(adapter, "--tau", "1"), 130, "interrupted")
    assert tree_hash(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_rename_keeps_the_old_output(adapter, tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    expect(run(adapter, "--tau", "1", "-o", out), EXIT_OK)
    before = tree_hash(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".s3lora-tmp"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(durable, "_renameat2", lambda *args: False)  # the two-rename fallback
    expect(run(adapter, "--tau", "2", "-o", out, "--force"), EXIT_RUNTIME, "No space left", "nothing was written")
    expect(run(adapter, "--tau", "2", "-o", tmp_path / "new"), EXIT_RUNTIME, "cannot write")
    assert tree_hash(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "pruned"]


# --------------------------------------------------------------------------------------- with the real PEFT

CASES = {
    "llama": (
        tiny_llama,
        {"target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"], "modules_to_save": ["lm_head"]},
    ),
    "llama-regex-exclude": (
        tiny_llama,
        {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": r"model\.layers\.0\.self_attn\.k_proj"},
    ),
    "llama-dora": (tiny_llama, {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}),
    "gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "bert-encoder": (tiny_bert, {"target_modules": ["query", "value", "dense"]}),
}
KEY_WARNING = re.compile(r"(missing|unexpected)[ _]?(adapter )?keys?|were not used|newly initiali[sz]ed", re.I)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per case: (the base model, the adapter directory PEFT saved for it)."""
    root = tmp_path_factory.mktemp("peft")
    made = {}
    for name, (build, lora) in CASES.items():
        base = build(layers=2)
        made[name] = base, save_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **lora), root / name)
    return made


@contextmanager
def recorded_warnings():
    """Every Python warning and every transformers / peft log record at WARNING or above, as text."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, loggers = Collect(logging.WARNING), [logging.getLogger(n) for n in ("transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def load(base, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


INPUT_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "case, mode",
    [
        ("llama", "zero"),
        ("llama", "drop"),
        ("llama-regex-exclude", "drop"),
        ("llama-dora", "zero"),
        ("gpt2-conv1d", "zero"),
        ("gpt2-conv1d", "drop"),
        ("bert-encoder", "zero"),
        ("bert-encoder", "drop"),
    ],
)
def test_peft_loads_the_pruned_adapter(saved, tmp_path, case, mode):
    base, src = saved[case]
    before = tree_hash(src)
    out = tmp_path / "pruned"
    expect(run(src, "--tau", "3", "--mode", mode, "-o", out, "-q", "--allow-large"), EXIT_OK)
    assert tree_hash(src) == before
    pruned = {p["module"]: p for p in json.loads((out / REPORT_NAME).read_text())["pruned"]}
    assert len(pruned) == 3

    with recorded_warnings() as messages:
        model = load(base, out)
    assert not [m for m in messages if KEY_WARNING.search(m)], messages
    file_keys = set(tensors(out))
    assert set(get_peft_model_state_dict(model)) == file_keys  # no missing and no unexpected key, exactly

    original = load(base, src)
    old_layers, new_layers = lora_modules(original), lora_modules(model)
    modules = dict(model.base_model.model.named_modules())
    for name, layer in old_layers.items():
        if name not in pruned:
            assert torch.equal(peft_delta(new_layers[name]), peft_delta(layer)), name
        elif pruned[name]["action"] == "zero":
            assert not peft_delta(new_layers[name]).any(), name
        else:
            assert name not in new_layers and not isinstance(modules[name], PeftLoraLayer), name
        if name in pruned:
            layer.enable_adapters(False)  # the original adapter with exactly the pruned modules disabled
    if case == "llama-dora":
        assert {p["action"] for p in pruned.values()} == {"drop"} and all("DoRA" in p["note"] for p in pruned.values())
    if mode == "drop" or case == "llama-dora":
        assert len(new_layers) == len(old_layers) - len(pruned)
        assert model.get_nb_trainable_parameters()[1] < original.get_nb_trainable_parameters()[1]
    with torch.no_grad():
        expected, got = original(input_ids=INPUT_IDS).logits, model(input_ids=INPUT_IDS).logits
    assert torch.equal(got, expected)


def test_the_layer_memo_scores_a_pruned_copy_as_a_fresh_run_does_and_skips_its_unchanged_layers(tmp_path, monkeypatch):
    from s3lora_cli import scoring

    adapter = write_adapter(tmp_path / "adapter")
    fresh = score_adapter(prune_adapter(adapter, tmp_path / "first", Selection(tau=2)).output)
    calls = []
    real = scoring.score_layer
    monkeypatch.setattr(scoring, "score_layer", lambda *a: calls.append(a[2].module) or real(*a))
    with scoring.layer_memo():
        result = prune_adapter(adapter, tmp_path / "pruned", Selection(tau=2))
        scored = len(calls)
        remembered = score_adapter(result.output)
    assert scored == len(result.report.layers)
    # only the two zeroed layers are new; every other layer of the copy is the same tensors
    assert sorted(calls[scored:]) == sorted(result.modules) and len(result.modules) == 2
    assert remembered.layers == fresh.layers
    with scoring.layer_memo():
        score_adapter(result.output, ScoreOptions(method=Method.SVD))  # other options: scored again
    assert len(calls) == scored + 2 + len(result.report.layers)
