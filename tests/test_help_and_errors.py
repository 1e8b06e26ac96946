"""The command line's own surface: one-line usage errors, -V, help without PyTorch, help texts that name their
defaults, and the light copies of library choices and defaults that the options need (kept equal here)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from s3lora_cli import __version__
from s3lora_cli.cli import DEFAULT_COMPONENTS, DEFAULT_TAU, EXIT_USAGE, ExitCode, MethodName, app
from s3lora_cli.cli.prune import ModeName
from s3lora_cli.cli.scan import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_NEIGHBOURS, DEFAULT_TOP

runner = CliRunner()
COMMANDS = ("score", "prune", "check", "scan", "admit")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["score", "--demo", "--tua", "3"],
            "error: No such option: --tua (Possible options: --tau, --top) (see 's3lora score --help')",
        ),
        (["score", "--demo", "--format", "xml"], "error: Invalid value for '--format' / '-f':"),
        (["score", "--demo", "--tau", "x"], "error: Invalid value for '--tau':"),
        (["check"], "error: Missing argument 'ADAPTER'. (see 's3lora check --help')"),
        (["frobnicate"], "error: No such command 'frobnicate'. (see 's3lora --help')"),
        (["prune", "x", "--demo"], "error: No such option: --demo (Possible options: --dtype, --mode)"),
        (["scan", "store", "--workers"], "error: Option '--workers' requires an argument. (see 's3lora scan --help')"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert "╭" not in result.stderr and "Usage:" not in result.stderr


def test_version_short_and_long():
    for flag in ("-V", "--version"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0 and result.stdout == f"s3lora {__version__}\n"


def test_no_arguments_prints_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "Commands:" in result.stdout and "-V, --version" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_placeholder_for_flags_and_names_defaults(command):
    text = runner.invoke(app, [command, "--help"]).stdout
    assert "<bool>" not in text and "Usage: s3lora " + command in text
    if command in ("score", "prune", "check"):
        assert "(default: min(8, r), r the layer's rank)" in " ".join(text.split())
    if command == "scan":
        assert "pip install 's3lora[ray]'" in " ".join(text.split())
    if command in ("check", "scan", "admit"):
        assert "(default: mas-svd)" in " ".join(text.split())


def test_help_and_the_cli_import_no_torch_numba_or_rich():
    """--help must answer at once: the command line, and --help of every command, load none of the heavy modules
    (PyTorch alone takes over a second to import); the commands import them when they run."""
    code = (
        "import io, sys, contextlib, typer.main\n"
        "from s3lora_cli.cli import app\n"
        "cmd = typer.main.get_command(app)\n"
        f"for name in {list(COMMANDS)!r} + [None]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        cmd.main(([name] if name else []) + ['--help'], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'numba', 'rich', 'numpy', 'safetensors', 'pydantic')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_light_copies_equal_the_library():
    from s3lora_cli import selection, spectral, store
    from s3lora_cli.pruning import PruneMode

    assert [m.value for m in MethodName] == [m.value for m in spectral.Method]
    assert [m.value for m in ModeName] == [m.value for m in PruneMode]
    assert (DEFAULT_TAU, DEFAULT_COMPONENTS) == (selection.DEFAULT_TAU, spectral.DEFAULT_COMPONENTS)
    assert (DEFAULT_TOP, DEFAULT_NEIGHBOURS, DEFAULT_DUPLICATE_THRESHOLD) == (
        store.DEFAULT_TOP,
        store.DEFAULT_NEIGHBOURS,
        store.DEFAULT_DUPLICATE_THRESHOLD,
    )
    assert MethodName.SVD.method() is spectral.Method.SVD


def test_every_option_has_help():
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            assert getattr(param, "help", None), (name, param.name)


def test_errors_of_the_installed_command_are_one_line(tmp_path):
    """As a person or CI sees them: stderr a pipe, no progress bar, no blank line, no box, no traceback."""
    (tmp_path / "notes.txt").write_text("not an adapter")
    for args, code in (
        (["score", str(tmp_path / "missing")], 3),
        (["score", "--demo", "--tua", "1"], 2),
        (["check", str(tmp_path)], 2),
        (["score", str(tmp_path / "notes.txt")], 3),
    ):
        out = subprocess.run(["s3lora", *args], capture_output=True, text=True)
        assert out.returncode == code, (args, out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, (args, out.stderr)
        assert out.stdout == ""


@pytest.mark.parametrize("how", ["flag", "environment", "neither"])
def test_debug_shows_the_traceback_of_an_internal_error(monkeypatch, how):
    """An internal error is one line and exit 4; --debug or S3LORA_DEBUG=1 adds its traceback, still exit 4."""
    import s3lora_cli.scoring as scoring

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(scoring, "score_adapter", boom)
    monkeypatch.delenv("S3LORA_DEBUG", raising=False)
    args = ["score", "--demo", "-q"]
    if how == "flag":
        args = ["--debug", *args]
    elif how == "environment":
        monkeypatch.setenv("S3LORA_DEBUG", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.RUNTIME == 4 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: internal error: RuntimeError: boom. Please report it.", result.stderr
    if how == "neither":
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    else:
        assert result.stderr.startswith("Traceback (most recent call last):") and "in boom" in result.stderr
    again = runner.invoke(app, ["score", "--demo", "-q"])  # --debug holds for its own run only
    assert ("Traceback" in again.stderr) == (how == "environment")


def test_exit_codes_are_one_enum():
    from s3lora_cli.cli import EXIT_SIGINT, EXIT_SIGTERM

    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130, 143]
    assert (EXIT_SIGINT, EXIT_SIGTERM) == (ExitCode.INTERRUPTED, ExitCode.TERMINATED) == (130, 143)


def test_each_shared_option_is_defined_once():
    """The options of cli/options.py are defined there only: no command module spells one of their flags again,
    except where the flag means something else there (prune's -o is the pruned adapter; adapt has its own
    --device default, a --force that starts a state over and a --threshold of the failure score; the --store of
    `adapt answer` must exist)."""
    import ast
    from pathlib import Path
    from typing import get_args

    from typer.models import OptionInfo

    from s3lora_cli.cli import options

    infos = [get_args(value)[1] for value in vars(options).values() if len(get_args(value)) == 2]
    shared = {info.default for info in infos if isinstance(info, OptionInfo)} | {options.FORMAT.default}
    assert {"--output", "--force", "--format", "--quiet", "--method", "--device", "--policy"} <= shared
    allowed = {
        "prune.py": {"--output"},
        "adapt.py": {"--force", "--device", "--threshold"},
        "adapt_loop.py": {"--force", "--threshold", "--store"},
    }
    folder = Path(options.__file__).parent
    for path in folder.glob("*.py"):
        if path.name == "options.py":
            continue
        spelled = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option":
                spelled |= {a.value for a in node.args if isinstance(a, ast.Constant) and a.value in shared}
        assert spelled <= allowed.get(path.name, set()), (path.name, spelled)
