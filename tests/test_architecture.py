"""Imports point one way: cli -> report, policy, scoring -> spectral, adapters -> errors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "s3lora_cli"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules() -> dict[str, set[str]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found[name] = imports_of(path)
    return found


def _uses(imported: set[str], prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in imported)


def test_only_the_cli_imports_typer():
    for name, imported in modules().items():
        if not name.startswith("s3lora_cli.cli"):
            assert not _uses(imported, "typer"), name


def test_the_math_imports_no_io_or_rendering():
    for module in ("s3lora_cli.spectral", "s3lora_cli.kernels"):
        imported = modules()[module]
        for forbidden in ("safetensors", "typer", "rich", "s3lora_cli.adapters", "s3lora_cli.scoring", "json"):
            assert not _uses(imported, forbidden), (module, forbidden)
    # the math's only own import is its compiled kernel
    assert {name for name in modules()["s3lora_cli.spectral"] if name.startswith("s3lora_cli")} <= {"s3lora_cli"}
    assert "from s3lora_cli import kernels" in (PACKAGE / "spectral.py").read_text()


def test_layers_point_one_way():
    rules = {
        "s3lora_cli.adapters": ("s3lora_cli.scoring", "s3lora_cli.policy", "s3lora_cli.report", "s3lora_cli.cli",
                                "s3lora_cli.spectral", "rich"),
        "s3lora_cli.scoring": ("s3lora_cli.policy", "s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.policy": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.gate": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.pruning": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.report": ("s3lora_cli.cli",),
        "s3lora_cli.errors": ("s3lora_cli.",),
    }
    for name, imported in modules().items():
        for owner, forbidden in rules.items():
            if name == owner or name.startswith(owner + "."):
                for bad in forbidden:
                    assert not any(i.startswith(bad) for i in imported if i != name), (name, bad)


MODEL_LAYER = ("s3lora_cli.lm", "s3lora_cli.evaluation", "s3lora_cli.cli.eval", "s3lora_cli.adapt",
               "s3lora_cli.cli.adapt", "s3lora_cli.cli.adapt_loop")
"""The modules that may import a model library (transformers, peft) or the model loader."""


def test_only_the_model_commands_import_the_model_layer():
    for name, imported in modules().items():
        if any(name == m or name.startswith(m + ".") for m in MODEL_LAYER):
            continue
        for optional in ("s3lora_cli.evaluation", "s3lora_cli.adapt", "s3lora_cli.lm", "transformers", "peft"):
            assert not _uses(imported, optional), (name, optional)
    for name, imported in modules().items():
        if name.startswith(("s3lora_cli.evaluation", "s3lora_cli.adapt")):
            assert not _uses(imported, "s3lora_cli.cli") and not _uses(imported, "typer"), name


def test_the_model_commands_import_their_subsystems_when_they_run():
    """Not when the command line is built: --help and the core commands never load them."""
    for command, subsystems in (("eval.py", ("s3lora_cli.evaluation", "s3lora_cli.lm")),
                                ("adapt.py", ("s3lora_cli.adapt", "s3lora_cli.lm")),
                                ("adapt_loop.py", ("s3lora_cli.adapt", "s3lora_cli.lm"))):
        tree = ast.parse((PACKAGE / "cli" / command).read_text())
        top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not any(m.startswith(subsystems) for m in top_level if m), command


def test_score_prune_and_check_never_load_a_model_library(tmp_path):
    """Run the core commands in a fresh interpreter and look at what it imported: no model library, no metric
    library, none of the model subsystems (the test lists what was loaded)."""
    import subprocess
    import sys

    program = f"""
import sys
import s3lora_cli
from typer.testing import CliRunner
from s3lora_cli.cli import DEMO_ADAPTER, app
runner = CliRunner()
out = {str(tmp_path / "pruned")!r}
for args in (["score", "--demo", "-q"], ["prune", str(DEMO_ADAPTER), "--tau", "1", "-o", out, "-q"],
             ["prune", str(DEMO_ADAPTER), "--tau", "2", "--dry-run", "-q"],
             ["check", str(DEMO_ADAPTER), "--max-ssi", "0.9", "-q"]):
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), (args, result.exit_code, result.stderr)
libraries = ("transformers", "peft", "accelerate", "matplotlib", "sklearn", "sacrebleu", "rouge_score")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in libraries
                or m.split(".")[:2] in (["s3lora_cli", "evaluation"], ["s3lora_cli", "adapt"], ["s3lora_cli", "lm"]))
print(",".join(loaded))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
