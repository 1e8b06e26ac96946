"""The GitHub workflows: every file passes actionlint, and the commands of the reusable s3lora gate workflow
run here as GitHub would run them (bash -eo pipefail, with the job summary, step outputs and RUNNER_TEMP)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_check import validate_sarif, write_adapters

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
GATE = ROOT / ".github" / "workflows" / "s3lora-gate.yml"
CALLER = ROOT / "tests" / "golden" / "s3lora-gate-caller.yml"  # the README's caller workflow
BIN = Path(sys.executable).parent


def actionlint() -> str:
    found = shutil.which("actionlint", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("actionlint is not installed: pip install -e '.[test]' installs it")
        pytest.skip("actionlint is not installed (pip install -e '.[test]')")
    return found


@pytest.mark.parametrize("path", WORKFLOWS + [CALLER], ids=lambda p: p.name)
def test_actionlint(path):
    result = subprocess.run([actionlint(), "-no-color", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads a bare `on` as true
    return doc


def steps() -> list[dict]:
    return load(GATE)["jobs"]["check"]["steps"]


def test_gate_is_a_reusable_workflow_with_adapter_and_policy_inputs():
    call = load(GATE)["on"]["workflow_call"]
    assert call["inputs"]["adapters"]["required"] is True
    assert call["inputs"]["policy"]["default"] == ""
    assert "exit-code" in call["outputs"]
    uses = [step.get("uses", "") for step in steps()]
    assert any(u.startswith("github/codeql-action/upload-sarif@") for u in uses)
    caller = load(CALLER)
    assert caller["jobs"]["gate"]["uses"].endswith("/.github/workflows/s3lora-gate.yml@main")
    assert set(caller["jobs"]["gate"]["with"]) <= set(call["inputs"])
    assert "security-events: write" in CALLER.read_text()
    assert len(CALLER.read_text().splitlines()) <= 10


def test_install_is_cpu_only_torch_first():
    (install,) = [s for s in steps() if "pip install" in s.get("run", "")]
    lines = [line for line in install["run"].splitlines() if "pip install" in line]
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[-2] and "torch" in lines[-2]
    assert lines[-1].endswith('"$PACKAGE"')


def run_install_step(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[list[str]], str]:
    """Run the install step's script with a stand-in ``python`` that records its arguments instead of installing;
    returns (exit code, the recorded command lines, stdout and stderr)."""
    (install,) = [s for s in steps() if "pip install" in s.get("run", "")]
    assert set(install["env"]) == {"PACKAGE", "WORKFLOW_REPOSITORY", "WORKFLOW_SHA"}
    assert install["env"]["WORKFLOW_REPOSITORY"] == "${{ job.workflow_repository }}"
    assert install["env"]["WORKFLOW_SHA"] == "${{ job.workflow_sha }}"
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    stub = bin_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "{log}"\nprintf "\\n" >> "{log}"\n')
    stub.chmod(0o755)
    script = tmp_path / "install.sh"
    script.write_text(install["run"])
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        capture_output=True,
        text=True,
        env={"PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]), **env},
    )
    calls = [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]
    return proc.returncode, calls, proc.stdout + proc.stderr


def test_install_defaults_to_the_repository_and_commit_the_workflow_comes_from(tmp_path):
    from packaging.requirements import Requirement

    sha = "0123456789abcdef0123456789abcdef01234567"
    rc, calls, _ = run_install_step(
        tmp_path, {"PACKAGE": "", "WORKFLOW_REPOSITORY": "someorg/s3lora", "WORKFLOW_SHA": sha}
    )
    assert rc == 0 and calls[-1][:3] == ["-m", "pip", "install"]
    requirement = Requirement(calls[-1][3])  # what pip is given: a PEP 508 direct reference
    assert requirement.name == "s3lora" and requirement.url == f"git+https://github.com/someorg/s3lora@{sha}"
    rc, calls, _ = run_install_step(
        tmp_path,
        {
            "PACKAGE": "s3lora @ git+https://github.com/fork/s3lora@v2",
            "WORKFLOW_REPOSITORY": "someorg/s3lora",
            "WORKFLOW_SHA": sha,
        },
    )
    assert rc == 0 and calls[-1][3] == "s3lora @ git+https://github.com/fork/s3lora@v2"  # the input wins
    rc, calls, out = run_install_step(tmp_path, {"PACKAGE": "", "WORKFLOW_REPOSITORY": "", "WORKFLOW_SHA": ""})
    assert rc == 4 and "set the package input" in out and calls == []
    call = load(GATE)["on"]["workflow_call"]["inputs"]["package"]
    assert call["default"] == "" and "package index" not in CALLER.read_text() and "package:" not in CALLER.read_text()


def test_readme_ci_example_is_the_tested_caller():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert CALLER.read_text() in blocks


def test_no_expression_is_spliced_into_a_script():
    # inputs reach the scripts through env only: no ${{ }} in a run block (script injection, and testability)
    for step in steps():
        assert "${{" not in step.get("run", ""), step.get("name")


def check_step() -> dict:
    (step,) = [s for s in steps() if s.get("id") == "check"]
    assert step["shell"] == "bash"
    return step


def run_check_step(workdir: Path, inputs: dict[str, str]) -> tuple[int, str, dict[str, str], Path]:
    """Run the check step's script the way GitHub runs `shell: bash`, with its env mapped from ``inputs`` (or
    the inputs' defaults). Returns (exit code, job summary, step outputs, RUNNER_TEMP)."""
    step = check_step()
    defaults = {name: spec.get("default", "") for name, spec in load(GATE)["on"]["workflow_call"]["inputs"].items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    for name, expression in step["env"].items():
        match = re.fullmatch(r"\$\{\{ inputs\.([a-z-]+) \}\}", expression)
        assert match, f"env {name} should be an input, got {expression!r}"
        env[name] = str(inputs.get(match[1], defaults[match[1]]))
    temp = workdir / "runner-temp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    summary, outputs = temp / "summary.md", temp / "outputs.txt"
    summary.touch()
    outputs.touch()
    env.update(
        RUNNER_TEMP=str(temp),
        GITHUB_STEP_SUMMARY=str(summary),
        GITHUB_OUTPUT=str(outputs),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    script = temp / "step.sh"
    script.write_text(step["run"])
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    return proc.returncode, summary.read_text(), found, temp


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = write_adapters(tmp_path_factory.mktemp("workflow"))
    (root / "policy.toml").write_text("max-ssi = 0.8\n")
    return root


def test_step_passes_and_writes_summary_and_sarif(workdir):
    rc, summary, outputs, temp = run_check_step(workdir, {"adapters": "adapters/smooth", "args": "--max-ssi 0.8"})
    assert rc == 0
    assert summary.startswith("### s3lora check: passed")
    assert outputs == {"sarif": "true", "exit-code": "0"}
    validate_sarif(json.loads((temp / "s3lora.sarif").read_text()))


def test_step_fails_the_job_on_a_failed_gate(workdir):
    # two adapters (one by a glob) and the policy file: the sharp one fails
    rc, summary, outputs, temp = run_check_step(
        workdir, {"adapters": "adapters/smoo*\n adapters/sharp", "policy": "policy.toml"}
    )
    assert rc == 1
    assert summary.startswith("### s3lora check: failed") and "1 of 2 adapters failed" in summary
    assert "| `model.layers.1.self_attn.v_proj` | max-ssi |" in summary
    assert outputs == {"sarif": "true", "exit-code": "1"}
    log = json.loads((temp / "s3lora.sarif").read_text())
    validate_sarif(log)
    assert [r["ruleId"] for r in log["runs"][0]["results"]] == ["max-ssi"]


def test_step_reports_a_tool_problem_as_such(workdir):
    rc, summary, outputs, _ = run_check_step(workdir, {"adapters": "adapters/smooth", "policy": "missing.toml"})
    assert rc == 2
    assert "could not run (exit code 2)" in summary
    assert outputs == {"exit-code": "2"}  # no SARIF to upload
