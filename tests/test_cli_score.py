"""`s3lora score` end to end: outputs, determinism, and every bad input's message and exit code."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_factory import config_dict, layer_tensors, random_factors, write_adapter
from typer.testing import CliRunner

from s3lora_cli import ScoreOptions, score_adapter
from s3lora_cli.cli import EXIT_INPUT, EXIT_RUNTIME, EXIT_USAGE, app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapter")


def test_table_on_demo():
    result = run("score", "--demo")
    assert result.exit_code == 0, result.stderr
    assert "model.layers.3.self_attn.o_proj" in result.stdout
    assert "LoRA layers scored" in result.stderr  # the summary goes to stderr, never to stdout
    assert "LoRA layers scored" not in result.stdout


def test_json_schema_and_order(adapter):
    result = run("score", adapter, "--format", "json", "--tau", "1")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 2
    assert doc["tool"]["name"] == "s3lora"
    assert set(doc["adapter"]) >= {
        "path",
        "sha256",
        "base_model_name_or_path",
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "format",
    }
    assert set(doc["parameters"]) >= {"method", "components", "top_h", "eps_norm", "eps_ssi", "device", "dtype"}
    layers = doc["layers"]
    assert [layer["module"] for layer in layers][0] == "model.layers.1.self_attn.v_proj"  # the sharp one
    ssis = [layer["ssi"] for layer in layers]
    assert ssis == sorted(ssis, reverse=True)
    for layer in layers:
        assert set(layer) >= {"module", "ssi", "sigma", "r", "scaling", "shape", "kind", "notes"}
        assert layer["kind"] == "linear" and layer["r"] == 4 and layer["scaling"] == 2.0
        assert len(layer["sigma"]) == 4 and layer["sigma"][0] == layer["sigma_1"]
    assert layers[0]["top_tau"] and not any(layer["top_tau"] for layer in layers[1:])
    assert doc["layers"][0]["shape"] == [8, 16]


def test_json_is_deterministic_and_matches_the_api(adapter):
    first, second = run("score", adapter, "-f", "json", "-q"), run("score", adapter, "-f", "json", "-q")
    assert first.stdout == second.stdout
    assert first.stderr == ""
    report = score_adapter(adapter, ScoreOptions())
    doc = json.loads(first.stdout)
    assert [s.module for s in report.layers] == [layer["module"] for layer in doc["layers"]]
    assert [layer["ssi"] for layer in doc["layers"]] == pytest.approx([s.ssi for s in report.layers], rel=1e-11)


def test_markdown_and_csv(adapter):
    md = run("score", adapter, "--format", "markdown", "-q")
    assert md.exit_code == 0
    assert md.stdout.count("\n| ") >= 5 and "`model.layers.1.self_attn.v_proj`" in md.stdout
    out = run("score", adapter, "--format", "csv", "-q")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 4 and rows[0]["module"] == "model.layers.1.self_attn.v_proj"
    assert float(rows[0]["ssi"]) > float(rows[1]["ssi"])


def test_output_file_is_written_atomically_and_not_overwritten(adapter, tmp_path):
    target = tmp_path / "report.json"
    assert run("score", adapter, "-f", "json", "-o", target, "-q").exit_code == 0
    assert json.loads(target.read_text())["layers"]
    target.write_text("keep me")
    refused = run("score", adapter, "-f", "json", "-o", target)
    assert refused.exit_code == EXIT_USAGE and "--force" in refused.stderr
    assert target.read_text() == "keep me"
    assert run("score", adapter, "-f", "json", "-o", target, "--force", "-q").exit_code == 0
    assert json.loads(target.read_text())["layers"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    table = tmp_path / "table.txt"
    assert run("score", adapter, "-o", table, "-q").exit_code == 0
    assert "model.layers.1.self_attn.v_proj" in table.read_text()


def test_methods_and_options(adapter):
    base = json.loads(run("score", adapter, "-f", "json", "-q").stdout)
    exhaustive = json.loads(run("score", adapter, "-f", "json", "-q", "--exhaustive").stdout)
    assert [x["ssi"] for x in base["layers"]] == [x["ssi"] for x in exhaustive["layers"]]
    svd = json.loads(run("score", adapter, "-f", "json", "-q", "--method", "svd").stdout)
    assert svd["parameters"]["method"] == "svd" and all(not x["picks"] for x in svd["layers"])
    small = json.loads(run("score", adapter, "-f", "json", "-q", "--components", "2", "--top-h", "1").stdout)
    assert all(x["components"] == 2 and x["top_h"] == 1 and len(x["sigma"]) == 1 for x in small["layers"])
    f64 = json.loads(run("score", adapter, "-f", "json", "-q", "--dtype", "float64", "--device", "cpu").stdout)
    for a, b in zip(base["layers"], f64["layers"], strict=True):
        assert a["module"] == b["module"] and math.isclose(a["ssi"], b["ssi"], rel_tol=1e-5)


def test_weights_file_path_is_accepted(adapter):
    result = run("score", adapter / "adapter_model.safetensors", "-f", "json", "-q")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["layers"]) == 4


# ------------------------------------------------------------------------------------------ bad input


def _expect(result, code: int, *fragments: str):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error:")
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path(tmp_path):
    _expect(run("score", tmp_path / "nope"), EXIT_INPUT, "no such file")


def test_no_weights_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config_dict()))
    _expect(run("score", tmp_path), EXIT_INPUT, "adapter_model.safetensors")


def test_no_config(adapter):
    (adapter / "adapter_config.json").unlink()
    _expect(run("score", adapter), EXIT_INPUT, "adapter_config.json")


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps(config_dict(r="8")), "'r' must be an integer"),
        (json.dumps(config_dict(r=0)), "positive"),
        (json.dumps({k: v for k, v in config_dict().items() if k != "lora_alpha"}), "'lora_alpha' is missing"),
        (json.dumps(config_dict(peft_type="IA3")), "LoRA"),
        (json.dumps(config_dict(rank_pattern={"(": 4})), "invalid regular expression"),
    ],
)
def test_malformed_config(adapter, text, fragment):
    (adapter / "adapter_config.json").write_text(text)
    _expect(run("score", adapter), EXIT_INPUT, fragment)


def test_truncated_safetensors(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _expect(run("score", adapter), EXIT_INPUT, "safetensors")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00{}"],
)
def test_corrupt_safetensors(adapter, payload):
    (adapter / "adapter_model.safetensors").write_bytes(payload)
    _expect(run("score", adapter), EXIT_INPUT)


def test_lora_a_without_lora_b(tmp_path):
    a, _ = random_factors(8, 8, 4, 0)
    write_adapter(tmp_path, {"model.layers.0.q_proj.lora_A.weight": a})
    _expect(run("score", tmp_path), EXIT_INPUT, "model.layers.0.q_proj", "no lora_B")


def test_inner_ranks_disagree(tmp_path):
    a, b = random_factors(8, 8, 4, 0)
    write_adapter(tmp_path, layer_tensors("model.layers.0.q_proj", a, b[:, :3]))
    _expect(run("score", tmp_path), EXIT_INPUT, "inner ranks disagree")


def test_rank_contradicts_config(tmp_path):
    a, b = random_factors(8, 8, 4, 0)
    write_adapter(tmp_path, layer_tensors("model.layers.0.q_proj", a, b), config_dict(r=8))
    _expect(run("score", tmp_path), EXIT_INPUT, "rank 4", "r=8")


def test_no_lora_tensors(tmp_path):
    write_adapter(tmp_path, {"model.embed.weight": torch.ones(3, 3)})
    _expect(run("score", tmp_path), EXIT_INPUT, "no LoRA tensors")


def test_non_finite_layer_is_reported_not_fatal(tmp_path):
    a, b = random_factors(8, 8, 4, 0)
    bad_a, bad_b = random_factors(8, 8, 4, 1)
    bad_b[2, 1] = float("nan")
    tensors = {**layer_tensors("model.layers.0.q_proj", a, b), **layer_tensors("model.layers.1.q_proj", bad_a, bad_b)}
    write_adapter(tmp_path, tensors)
    result = run("score", tmp_path, "-f", "json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout, parse_constant=lambda token: pytest.fail(f"{token} in JSON"))
    bad = doc["layers"][-1]
    assert bad["module"] == "model.layers.1.q_proj" and bad["ssi"] is None and "non-finite" in bad["error"]
    assert doc["summary"]["non_finite"] == 1
    assert "warning: model.layers.1.q_proj" in result.stderr


def test_all_zero_update_scores_zero(tmp_path):
    a, b = random_factors(8, 8, 4, 0)
    write_adapter(tmp_path, layer_tensors("model.layers.0.q_proj", a, torch.zeros_like(b)))
    for method in ("mas-svd", "spsvd", "svd"):
        layer = json.loads(run("score", tmp_path, "-f", "json", "-q", "--method", method).stdout)["layers"][0]
        assert layer["ssi"] == 0.0 and "all-zero update: SSI is 0" in layer["notes"]


def test_bin_adapter_loads_with_weights_only(tmp_path, adapter):
    from safetensors.torch import load_file

    state = load_file(adapter / "adapter_model.safetensors")
    target = tmp_path / "bin"
    target.mkdir()
    torch.save(state, target / "adapter_model.bin")
    (target / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    from_bin = json.loads(run("score", target, "-f", "json", "-q").stdout)
    from_st = json.loads(run("score", adapter, "-f", "json", "-q").stdout)
    assert from_bin["adapter"]["format"] == "peft-bin"
    assert [x["ssi"] for x in from_bin["layers"]] == [x["ssi"] for x in from_st["layers"]]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capfd):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config_dict()))
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    _expect(run("score", tmp_path), EXIT_INPUT, "weights_only")
    assert "this must never run" not in capfd.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_requested_but_absent(adapter):
    _expect(run("score", adapter, "--device", "cuda"), EXIT_RUNTIME, "CUDA is not available")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--device", "tpu"], "--device"),
        (["--components", "0"], "--components"),
        (["--top-h", "0"], "--top-h"),
        (["--dtype", "float16"], "--dtype"),
        (["--tau", "-1"], "--tau"),
    ],
)
def test_bad_options(adapter, args, fragment):
    _expect(run("score", adapter, *args), EXIT_USAGE, fragment)


def test_usage_errors_from_typer_exit_2(adapter):
    assert run("score", adapter, "--format", "yaml").exit_code == EXIT_USAGE
    assert run("score", adapter, "--method", "pca").exit_code == EXIT_USAGE
    _expect(run("score"), EXIT_USAGE, "--demo")
    _expect(run("score", adapter, "--demo"), EXIT_USAGE, "not both")


def test_unexpected_errors_never_look_like_a_failed_gate(adapter, monkeypatch):
    import s3lora_cli.scoring

    def boom(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(s3lora_cli.scoring, "score_adapter", boom)
    _expect(run("score", adapter), EXIT_RUNTIME, "internal error", "boom")


# ------------------------------------------------------------------------------------------ installed entry point


def test_installed_entry_point(adapter):
    version = subprocess.run(["s3lora", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("s3lora ")
    out = subprocess.run(
        [sys.executable, "-m", "s3lora_cli", "score", str(adapter), "-f", "json", "-q"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layers"]
    bad = subprocess.run(["s3lora", "score", str(adapter / "missing")], capture_output=True, text=True)
    assert bad.returncode == EXIT_INPUT and "Traceback" not in bad.stderr


def test_worked_check_end_to_end(tmp_path):
    """The spec's worked check through the whole tool: a PEFT file with B (5 x 2), A (2 x 4), r = 2 and
    lora_alpha = 2 (scaling 1)."""
    b = torch.tensor([[2, 1], [1, -1], [0, 3], [-1, 2], [4, 0.5]], dtype=torch.float64)
    a = torch.tensor([[1, 0, -2, 1], [0.5, 1, 1, -1]], dtype=torch.float64)
    write_adapter(
        tmp_path,
        layer_tensors("model.layers.0.self_attn.q_proj", a, b),
        config_dict(r=2, lora_alpha=2),
        dtype=torch.float64,
    )
    doc = json.loads(run("score", tmp_path, "-f", "json", "-q", "--dtype", "float64").stdout)
    layer = doc["layers"][0]
    assert [(p["a"], p["b"]) for p in layer["picks"]] == [(1, 1), (2, 2)]
    assert layer["sigma"] == pytest.approx([331.5348535575, 161.5729241058], rel=1e-9)
    assert layer["ssi"] == pytest.approx(0.6723375049, abs=1e-9)
    svd = json.loads(run("score", tmp_path, "-f", "json", "-q", "--method", "svd").stdout)["layers"][0]
    assert svd["ssi"] == pytest.approx(0.6872004952, rel=1e-5)


def test_score_options_take_the_method_by_name(adapter):
    from s3lora_cli import Method, UsageError

    assert ScoreOptions(method="svd").method is Method.SVD
    with pytest.raises(UsageError, match="method must be one of"):
        ScoreOptions(method="fancy")
    report = score_adapter(adapter, ScoreOptions(method="spsvd", device="cpu"))
    assert report.options.method is Method.SPSVD


def test_svd_scores_without_loading_pytorch(tmp_path):
    """``--method svd`` (and the report, the readers, the summary) never imports PyTorch or the compiled kernels:
    its start-up is NumPy's. The default method loads both, and gives the same layers."""
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from s3lora_cli.cli import app\n"
        "result = CliRunner().invoke(app, sys.argv[1:])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(json.dumps([json.loads(result.stdout)['parameters']['device'], "
        "sorted(m for m in ('torch', 'numba') if m in sys.modules)]))\n"
    )

    def loaded(*args: str) -> list:
        out = subprocess.run(
            [sys.executable, "-c", code, "score", "--demo", "-f", "json", "-q", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert loaded("--method", "svd") == ["cpu", []]
    assert loaded("--method", "svd", "--device", "cuda") == ["cpu", []]  # svd's r x r work stays on the CPU
    assert loaded("--method", "mas-svd", "--device", "cpu") == ["cpu", ["numba", "torch"]]


def test_svd_refuses_a_misspelt_device():
    result = run("score", "--demo", "--method", "svd", "--device", "gpu")
    assert result.exit_code == EXIT_USAGE and "--device 'gpu': expected auto, cpu, cuda or cuda:N" in result.output


def test_scan_workers_load_no_pytorch_for_svd(tmp_path):
    """``scan --workers 2 --method svd``: neither the command nor its worker processes import PyTorch (each
    process started with ``-X importtime`` reports every import on stderr)."""
    for i in range(3):
        write_adapter(tmp_path / "store" / f"a{i}")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    cmd = [sys.executable, "-m", "s3lora_cli", "scan", str(tmp_path / "store"), "--workers", "2", "--no-cache"]
    out = subprocess.run([*cmd, "--method", "svd", "-q", "-f", "json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(json.loads(out.stdout)["adapters"]) == 3
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "s3lora_cli.store.scan" in imported and "numpy" in imported  # the workers' imports are seen
    assert "torch" not in imported and "numba" not in imported
