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


def test_the_core_never_imports_the_adapt_subsystem():
    """Only the adapt command module refers to s3lora_cli.adapt, and only inside its commands."""
    for name, imported in modules().items():
        if not (name.startswith("s3lora_cli.adapt") or name == "s3lora_cli.cli.adapt"):
            assert not _uses(imported, "s3lora_cli.adapt"), name
    tree = ast.parse((PACKAGE / "cli" / "adapt.py").read_text())
    top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith("s3lora_cli.adapt") or m.startswith("s3lora_cli.lm") for m in top_level)


def test_score_prune_and_check_load_neither_adapt_nor_transformers(tmp_path):
    """Importing s3lora_cli, the CLI, and running score, prune and check on the demo adapter never loads
    s3lora_cli.adapt, s3lora_cli.lm, transformers, scikit-learn or the metric libraries (the test fails when
    one of them is loaded: it lists them)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import s3lora_cli\n"
        "from typer.testing import CliRunner\n"
        "from s3lora_cli import cli\n"
        f"out = {str(tmp_path / 'pruned')!r}\n"
        "for args in (['score', '--demo', '-q'], ['check', str(cli.DEMO_ADAPTER), '--max-ssi', '0.9', '-q'],\n"
        "             ['prune', str(cli.DEMO_ADAPTER), '--tau', '1', '-o', out, '-q']):\n"
        "    r = CliRunner().invoke(cli.app, args)\n"
        "    assert r.exit_code in (0, 1), (args, r.exit_code, r.stderr)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'sklearn', 'sacrebleu', 'rouge_score')"
        " or m == 's3lora_cli.adapt' or m.startswith('s3lora_cli.adapt.') or m == 's3lora_cli.lm']\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
