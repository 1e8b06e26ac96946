"""Regenerate the golden files: those of `s3lora check` (tests/golden/check-*.md, check-*.sarif), of the score and
prune reports (tests/golden/score-*.json|md, prune-*.json|md, from tests/test_golden_reports.py) and the text
tables at 80, 100, 120 and 200 columns and full width (tests/golden/*-table-*.txt, from tests/test_tables.py).

Writes the tiny test adapters into a temporary directory, runs each scenario of tests/test_check.py from there
(so no absolute path enters the files), and writes the Markdown and SARIF outputs. Review the diff before
committing:  python scripts/regen_golden.py && git diff tests/golden
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_check  # noqa: E402
import test_golden_reports  # noqa: E402
import test_tables  # noqa: E402


def main() -> None:
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        test_check.write_adapters(Path(tmp))
        os.chdir(tmp)
        try:
            rendered = {
                name: text
                for scenario in test_check.SCENARIOS
                for name, text in test_check.render_golden(scenario).items()
            }
            rendered.update(
                {
                    name: text
                    for scenario in test_golden_reports.SCENARIOS
                    for name, text in test_golden_reports.render_golden(scenario).items()
                }
            )
        finally:
            os.chdir(here)
    rendered.update(test_tables.render_goldens())
    for name, text in rendered.items():
        (test_check.GOLDEN / name).write_text(text)
        print(f"wrote {test_check.GOLDEN / name}")


if __name__ == "__main__":
    main()
