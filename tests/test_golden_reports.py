"""Golden files of the score and prune reports: ``score --format json|markdown`` and the report ``prune`` prints
(``--format json|markdown``, a dry run), on the tiny adapters of test_check.py, run from their directory so that
no absolute path enters the files. Regenerate with ``python scripts/regen_golden.py`` and review the diff."""

from __future__ import annotations

import json

import pytest
from test_check import GOLDEN, _rounded, write_adapters
from typer.testing import CliRunner

from s3lora_cli import __version__
from s3lora_cli.cli import EXIT_OK, app

runner = CliRunner()
VERSION_MARK = "<s3lora version>"

SCENARIOS = {
    "score-sharp": ["score", "adapters/sharp", "--tau", "2"],
    "prune-sharp": ["prune", "adapters/sharp", "--tau", "2", "--dry-run", "-o", "pruned/sharp"],
    "prune-threshold-drop": [
        "prune",
        "adapters/candidate",
        "--threshold",
        "0.5",
        "--mode",
        "drop",
        "--dry-run",
        "-o",
        "pruned/candidate",
        "--allow-large",
    ],
}
FORMATS = (("json", "json"), ("markdown", "md"))


def render_golden(name: str) -> dict[str, str]:
    """The JSON and Markdown of a scenario, run from the current directory (which holds adapters/)."""
    out = {}
    for fmt, suffix in FORMATS:
        result = runner.invoke(app, [*SCENARIOS[name], "--device", "cpu", "-q", "-f", fmt])
        assert result.exit_code == EXIT_OK, result.output
        text = result.stdout
        if fmt == "json":
            text = text.replace(f'"version": "{__version__}"', f'"version": "{VERSION_MARK}"')
        out[f"{name}.{suffix}"] = text
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, str]:
    import os

    root = write_adapters(tmp_path_factory.mktemp("golden"))
    here = os.getcwd()
    os.chdir(root)
    try:
        return {filename: text for name in SCENARIOS for filename, text in render_golden(name).items()}
    finally:
        os.chdir(here)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("suffix", [suffix for _, suffix in FORMATS])
def test_golden_score_and_prune_reports(reports, name, suffix):
    filename = f"{name}.{suffix}"
    text, golden = reports[filename], (GOLDEN / filename).read_text()
    if suffix == "json":  # floats compared to 6 significant digits, what float32 scores are stable to
        assert _rounded(json.loads(text)) == _rounded(json.loads(golden)), filename
    else:
        assert text == golden, f"{filename} differs: run python scripts/regen_golden.py and review the diff"


def test_the_golden_json_is_a_whole_report(reports):
    """The files hold what the JSON documents promise: every layer, ranked, with the version marked."""
    score = json.loads(reports["score-sharp.json"])
    assert score["tool"] == {"name": "s3lora", "version": VERSION_MARK} and score["parameters"]["tau"] == 2
    assert [layer["rank"] for layer in score["layers"]] == list(range(1, len(score["layers"]) + 1))
    prune = json.loads(reports["prune-sharp.json"])
    assert prune["prune"]["written"] is False and [p["rank"] for p in prune["pruned"]] == [1, 2]
