"""Imports point one way: cli -> report, selection, scoring -> spectral, adapters -> errors; nothing inside the
package imports the package root, and the import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "s3lora_cli"
ROOT = "s3lora_cli"


def module_names(package: Path = PACKAGE) -> set[str]:
    """The dotted name of every module of ``package`` (a package by the name of its ``__init__``)."""
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        found.add(".".join(p for p in rel.parts if p != "__init__"))
    return found


def imports_of(path: Path, known: set[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function. ``from package import name`` is read as
    ``package.name`` when that is a module of ``known`` (``from s3lora_cli import report``), else as ``package``
    (``from s3lora_cli import __version__`` imports the package root)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in known else node.module)
    return names


def modules(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = module_names(package)
    found = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found[name] = imports_of(path, known)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> the modules it imports): each strongly connected component of
    more than one module, or a module that imports itself, sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return sorted(found)


def internal_graph(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: {i for i in imported if i in found} for name, imported in found.items()}


def root_importers(found: dict[str, set[str]]) -> list[str]:
    """The modules of the package that import its root (``from s3lora_cli import __version__``)."""
    return sorted(name for name, imported in found.items() if name != ROOT and ROOT in imported)


def test_nothing_inside_the_package_imports_its_root():
    assert root_importers(modules()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(internal_graph(modules())) == []


def test_the_version_is_written_once():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "s3lora_cli._version.__version__" in pyproject
    assert "\nversion =" not in pyproject.split("[project]")[1].split("\n[")[0]
    from s3lora_cli import __version__
    from s3lora_cli._version import __version__ as written

    assert __version__ is written


def test_the_checks_see_a_cycle_a_root_import_and_a_from_import(tmp_path):
    """The checks above fail on a bad package: a cycle through ``from pkg import module``, a module importing
    the root, a module importing itself."""
    package = tmp_path / ROOT
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0'\n")
    (package / "a.py").write_text("from s3lora_cli import b\n")
    (package / "b.py").write_text("def f():\n    from s3lora_cli.sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from s3lora_cli import a, __version__\n")
    (package / "d.py").write_text("import s3lora_cli.d\n")
    (package / "e.py").write_text("from s3lora_cli import report\n")
    found = modules(package)
    assert found["s3lora_cli.a"] == {"s3lora_cli.b"} and found["s3lora_cli.e"] == {"s3lora_cli"}
    assert cycles(internal_graph(found)) == [["s3lora_cli.a", "s3lora_cli.b", "s3lora_cli.sub.c"], ["s3lora_cli.d"]]
    assert root_importers(found) == ["s3lora_cli.e", "s3lora_cli.sub.c"]
    assert cycles({"x": {"y"}, "y": set()}) == []
    with pytest.raises(AssertionError):
        assert cycles(internal_graph(found)) == []


def _uses(imported: set[str], prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in imported)


def test_only_the_cli_imports_typer():
    for name, imported in modules().items():
        if not name.startswith("s3lora_cli.cli"):
            assert not _uses(imported, "typer"), name


def test_the_math_imports_no_io_or_rendering():
    math = {
        name: imported
        for name, imported in modules().items()
        if name == "s3lora_cli.spectral" or name.startswith("s3lora_cli.engine")
    }
    assert "s3lora_cli.engine.kernels" in math
    for module, imported in math.items():
        for forbidden in ("safetensors", "typer", "rich", "s3lora_cli.adapters", "s3lora_cli.scoring", "json"):
            assert not _uses(imported, forbidden), (module, forbidden)
        # the math imports only itself: the engine's modules (its compiled kernels among them)
        assert {name for name in imported if name.startswith("s3lora_cli")} <= {"s3lora_cli.engine"} | {
            name for name in math
        }, module


def test_layers_point_one_way():
    rules = {
        "s3lora_cli.adapters": (
            "s3lora_cli.scoring",
            "s3lora_cli.selection",
            "s3lora_cli.report",
            "s3lora_cli.cli",
            "s3lora_cli.spectral",
            "rich",
        ),
        "s3lora_cli.scoring": ("s3lora_cli.selection", "s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.selection": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.document": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
        "s3lora_cli.store": ("s3lora_cli.report", "s3lora_cli.cli", "rich"),
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


MODEL_LAYER = (
    "s3lora_cli.lm",
    "s3lora_cli.evaluation",
    "s3lora_cli.cli.eval",
    "s3lora_cli.adapt",
    "s3lora_cli.cli.adapt",
    "s3lora_cli.cli.adapt_loop",
)
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
    for command, subsystems in (
        ("eval.py", ("s3lora_cli.evaluation", "s3lora_cli.lm")),
        ("adapt.py", ("s3lora_cli.adapt", "s3lora_cli.lm")),
        ("adapt_loop.py", ("s3lora_cli.adapt", "s3lora_cli.lm")),
    ):
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
