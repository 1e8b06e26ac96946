"""The README stays true: its commands and options exist, its exit codes match, its examples run. A command
group whose reference lives in docs (REFERENCES) is held to that page instead."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from s3lora_cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REFERENCES = {"adapt": (ROOT / "docs" / "adapt.md").read_text()}
"""Command groups whose every option is documented in a page of docs/ (the README links to it)."""


def reference_of(command: str) -> str:
    return REFERENCES.get(command.split()[0], README)


def code_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def s3lora_invocations() -> list[list[str]]:
    calls = []
    for line in code_lines():
        for part in line.split("&&"):
            words = shlex.split(part.strip())
            if words and words[0] == "s3lora":
                calls.append(words[1:])
    return calls


def leaf_commands(command=None, prefix: str = "") -> dict[str, object]:
    """Every command by its full name ('score', 'adapt trigger'), through command groups."""
    command = command or typer.main.get_command(cli.app)
    found = {}
    for name, sub in getattr(command, "commands", {}).items():
        full = f"{prefix}{name}"
        found.update(leaf_commands(sub, full + " ") if hasattr(sub, "commands") else {full: sub})
    return found


def command_params(name: str) -> set[str]:
    command = leaf_commands()[name]
    return {opt for p in command.params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}


def test_readme_commands_and_options_exist():
    commands = leaf_commands()
    calls = s3lora_invocations()
    assert calls, "the README shows no s3lora command"
    for words in calls:
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0]
        assert name in commands, words
        known = command_params(name)
        for word in words[len(name.split()) :]:
            if word.startswith("-"):
                assert word.split("=")[0] in known, (words, word)


def test_option_tables_name_real_options():
    group = typer.main.get_command(cli.app)
    top_level = {opt for p in group.params for opt in p.opts} | {"--help"}
    commands = leaf_commands()
    for text in (README, *REFERENCES.values()):
        for option in re.findall(r"`(--[a-z][a-z-]*)`", text):
            assert option in top_level or any(option in command_params(name) for name in commands), option


def test_every_option_is_documented():
    for name in leaf_commands():
        for option in command_params(name):
            if option.startswith("--") and option not in ("--help", "--no-strict-layers"):
                assert f"`{option}" in reference_of(name), (name, option)


def test_exit_code_table_matches_the_cli():
    table = dict(re.findall(r"^\| (\d) \| (.+?) \|$", README, flags=re.M))
    assert set(table) == {"0", "1", "2", "3", "4"}
    assert (cli.EXIT_OK, cli.EXIT_GATE_FAILED, cli.EXIT_USAGE, cli.EXIT_INPUT, cli.EXIT_RUNTIME) == (0, 1, 2, 3, 4)
    assert "gate" in table["1"] and "usage" in table["2"] and "input" in table["3"] and "runtime" in table["4"]
    signals = re.findall(r"^\| (\d+), (\d+) \| (.+?) \|$", README, flags=re.M)
    assert [(int(a), int(b)) for a, b, _ in signals] == [(cli.ExitCode.INTERRUPTED, cli.ExitCode.TERMINATED)]
    assert "SIGINT" in signals[0][2] and "SIGTERM" in signals[0][2]
    assert {int(code) for code in table} | {130, 143} == {int(code) for code in cli.ExitCode}


def test_readme_demo_commands_run():
    runner = CliRunner()
    demo_calls = [words for words in s3lora_invocations() if "--demo" in words]
    assert demo_calls
    for words in demo_calls:
        result = runner.invoke(cli.app, words)
        assert result.exit_code == 0, (words, result.stderr)


def test_ci_runs_the_readme_test_command():
    test_command = "pip install -e '.[test]' && python -m pytest -q"
    assert test_command in README
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in (ROOT / ".ci" / "run").read_text()
    assert test_command in (ROOT / ".github" / "workflows" / "ci.yml").read_text()


def test_license_file_matches_the_package_metadata():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    license_id = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert license_id == "Apache-2.0"
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text


def test_readme_opens_with_what_ssi_means_and_what_to_do():
    opening = README[: README.index("## Quick start")]
    for words in (
        "Spectral Sharpness Index",
        "safety risk",
        "top tau",
        "rank-based",
        "Compare with a baseline",
        "Prune and evaluate",
        "Review",
        "violation",
        "non-finite",
        "top-tau",
    ):
        assert words in opening, words
