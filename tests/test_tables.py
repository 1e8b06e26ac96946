"""The text tables: golden files at 80, 100, 120 and 200 columns and for a pipe (full rows), and the layout rules
they follow at any width (fit the width, keep each module name's last component, ssi with 4 decimals)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3lora_cli.adapters.base import LayerKind, LoraLayer
from s3lora_cli.gate import GatePolicy, evaluate
from s3lora_cli.report import (
    ELLIPSIS,
    LAYER_COLUMNS,
    VIOLATION,
    Column,
    check_dict,
    common_prefix,
    render_gate_markdown,
    render_gate_text,
    render_scan_table,
    render_table,
    sarif_dict,
    text_table,
)
from s3lora_cli.scoring import AdapterInfo, LayerScore, ScoreOptions, ScoreReport, rank_key
from s3lora_cli.spectral import Pick
from s3lora_cli.store import ScanResult, ScanRow, ScanSettings, TopLayer

GOLDEN = Path(__file__).resolve().parent / "golden"
WIDTHS = (80, 100, 120, 200, None)  # None: not a terminal, full rows


def _layer(
    module: str,
    ssi: float | None,
    sigma: tuple[float, ...],
    picks: tuple[Pick, ...] = (),
    notes: tuple[str, ...] = (),
    error: str | None = None,
) -> LayerScore:
    layer = LoraLayer(module, LayerKind.LINEAR, (1024, 1024), 16, 32.0, 2.0, "F32", {})
    return LayerScore(layer, ssi, sigma, 8, 8, picks, (8, 8), 0, 0, notes, error)


def t5_like_report() -> ScoreReport:
    """A fixed report shaped like a t5-large r=16 LoRA: long module names whose last component (q or v) is the
    only part that tells some of them apart, rank-1 fits (SSI 1 by construction), a NaN layer, and more than 99
    ranks."""
    layers = []
    shared_v = tuple(Pick(a, 1, 1.0 / a, 0.0) for a in range(1, 9))  # every pick on right candidate 1: rank 1
    for block in range(26):
        for stack in ("encoder", "decoder"):
            for part, proj in (("layer.0.SelfAttention", "q"), ("layer.1.EncDecAttention", "v")):
                if stack == "encoder" and part.startswith("layer.1"):
                    part = "layer.0.SelfAttention"
                    proj = "v"
                module = f"{stack}.block.{block}.{part}.{proj}"
                seed = (block * 7 + len(stack) * 3 + len(part)) % 23
                if stack == "decoder" and proj == "v" and block % 5 == 0:
                    layers.append(
                        _layer(
                            module,
                            1.0 - 1e-8 * (block + 1),
                            (20.0 + block, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                            shared_v,
                        )
                    )
                    continue
                s1 = 1.0 + seed / 10
                sigma = (s1, s1 * 0.5, s1 * 0.25, s1 * 0.1, 0.05, 0.02, 0.01, 0.005)
                layers.append(_layer(module, s1 / (sum(sigma) + 1e-6), sigma))
    layers.append(
        _layer(
            "decoder.block.25.layer.1.EncDecAttention.q",
            None,
            (),
            error="non-finite values (NaN or Inf) in lora_B; not scored",
        )
    )
    info = AdapterInfo(
        "adapters/t5-bias",
        "adapters/t5-bias/adapter_model.safetensors",
        "0" * 64,
        "peft-safetensors",
        "t5-large",
        "LORA",
        16,
        32,
        False,
        False,
        ["q", "v"],
    )
    return ScoreReport(
        info, ScoreOptions(), "cpu", tuple(sorted(layers, key=rank_key)), (), "0.1.0", {"method": "mas-svd"}
    )


def scan_result() -> ScanResult:
    top = (TopLayer("decoder.block.19.layer.1.EncDecAttention.v", 1.0), TopLayer("encoder.block.3.layer.0.q", 0.61))
    rows = (
        ScanRow(
            "team-a/sharp-adapter-with-a-long-name",
            "1" * 64,
            144,
            144,
            1.0,
            47,
            top,
            False,
            ("decoder.block.19.layer.1.EncDecAttention.v: SSI 1.0000 exceeds max-ssi 0.9",),
        ),
        ScanRow("team-b/calm", "2" * 64, 36, 36, 0.49, 0, top[1:], True),
        ScanRow("broken", error="adapter_config.json: not valid JSON (line 1)"),
    )
    return ScanResult(Path("store"), rows, ScanSettings(policy=GatePolicy(max_ssi=0.9)), None)


def render_goldens() -> dict[str, str]:
    """Every golden table, by file name (scripts/regen_golden.py writes them)."""
    report = t5_like_report()
    top_tau = {s.module for s in report.layers[:10]}
    gate = evaluate(report, GatePolicy(max_ssi=0.99))
    out = {}
    for width in WIDTHS:
        name = "full" if width is None else str(width)
        out[f"score-table-{name}.txt"] = render_table(report, top_tau, tau=10, width=width)
        out[f"check-table-{name}.txt"] = render_gate_text(gate, width, verbose=True)
        out[f"scan-table-{name}.txt"] = render_scan_table(scan_result(), width=width)
    return out


@pytest.mark.parametrize("name", sorted(render_goldens()))
def test_golden_tables(name):
    text = render_goldens()[name]
    assert text == (GOLDEN / name).read_text(), f"{name} differs: run python scripts/regen_golden.py and review"


@pytest.mark.parametrize("width", [w for w in WIDTHS if w is not None])
def test_tables_fit_the_width_and_keep_what_matters(width):
    report = t5_like_report()
    text = render_table(report, {s.module for s in report.layers[:10]}, tau=10, width=width)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank")) + 1
    rows = lines[start : start + len(report.layers)]
    assert all(len(line) <= width for line in lines), width
    for row, score in zip(rows, report.layers, strict=True):
        rank, *rest = row.split()
        assert int(rank) == report.layers.index(score) + 1  # ranks above 99 are whole
        name = next(cell for cell in rest if cell != "*")
        last = score.module.rsplit(".", 1)[1]
        assert name.endswith("." + last) and (score.module.endswith(name.lstrip(ELLIPSIS)))
        ssi = re.search(r"\s(\d\.\d{4}|-)\s", row).group(1)
        assert ssi == ("-" if score.ssi is None else f"{score.ssi:.4f}")
    assert "not shown at" in text if width < 200 else True
    for other in (
        render_gate_text(evaluate(report, GatePolicy(max_ssi=0.99)), width, verbose=True),
        render_scan_table(scan_result(), width=width),
    ):
        assert all(len(line) <= width for line in other.splitlines())


def test_full_rows_when_not_a_terminal():
    report = t5_like_report()
    text = render_table(report, (), tau=0)
    assert all(score.module in text for score in report.layers)  # every name whole, no prefix removed
    assert "rank-1 fit (all 8 picks share right candidate 1): SSI is 1 by construction" in text
    assert "not shown" not in text and ELLIPSIS not in text


def test_common_prefix_keeps_the_last_component():
    assert common_prefix(["model.layers.0.q_proj", "model.layers.1.q_proj"]) == "model.layers."
    assert common_prefix(["a.b.q", "a.b.v"]) == "a.b."
    assert common_prefix(["a.b", "a.b"]) == "a."  # never a whole name
    assert common_prefix(["x.q", "y.q"]) == "" and common_prefix(["only.one"]) == ""


@given(
    st.lists(
        st.tuples(st.text("abc.", min_size=1, max_size=60), st.text("xyz ", max_size=80)), min_size=1, max_size=12
    ),
    st.integers(40, 200),
)
def test_text_table_fits_any_width_it_can(rows, width):
    """Lines fit ``width`` whenever the columns that always stay fit at their shortest; a shortened name keeps
    its end (from the left), shortened free text its start."""
    columns = (
        Column("rank", right=True),
        Column("module", shorten="left"),
        Column("ssi", right=True),
        Column("notes", drop=1, early=True, shorten="right"),
    )
    cells = [[str(i), name, "0.1234", note] for i, (name, note) in enumerate(rows, start=1)]
    lines, hidden = text_table(columns, cells, width)
    names = [c[1] for c in cells]
    longest_last = max(len(n.rsplit(".", 1)[-1]) for n in names)
    shortest = len("rank") + 2 + min(max(map(len, names)), max(longest_last + 1, 28)) + 2 + len("0.1234")
    if shortest <= width:
        assert all(len(line) <= width for line in lines)
    for line, (_, name, _, _) in zip(lines[1:], cells, strict=True):
        shown = line[len("rank") + 2 :].split("  ")[0].rstrip()
        assert shown == name.rstrip() or (shown.startswith(ELLIPSIS) and name.endswith(shown[1:]))
    assert set(hidden) <= {"notes"}


def test_layer_columns_give_way_in_the_documented_order():
    order = [c.header for c in sorted((c for c in LAYER_COLUMNS if c.drop), key=lambda c: c.drop)]
    assert order == ["notes", "sigma_sum", "sigma_1", "kind", "shape", "r", "fit", "z"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "(notes, sigma_sum, sigma_1, kind, shape, then r, fit,\nz)" in readme


def test_check_marks_violations_with_the_same_word_everywhere():
    report = t5_like_report()
    gate = evaluate(report, GatePolicy(max_ssi=0.99))
    text = render_gate_text(gate, 120, verbose=True)
    assert "! violation: the layer broke a gate rule" in text
    sarif = sarif_dict([gate])["runs"][0]["results"]
    assert all(r["message"]["text"].startswith(f"{r['ruleId']} violation (fails): ") for r in sarif)
    assert text.splitlines()[0].startswith(
        f"FAILED adapters/t5-bias: {len(gate.failing)} layer(s) fail the gate (non-finite: 1 violation; max-ssi 0.99:"
    )
    short = render_gate_text(gate, 120)
    assert "s3lora mas-svd scores" not in short and "--verbose lists them all" in short
    markdown = render_gate_markdown([gate])
    assert "| rule | limit | allowed | violations |" in markdown and "Violations:" in markdown
    assert "| rank | module | ssi | violation |" in markdown
    doc = check_dict([gate])
    assert doc["summary"]["violations"] and all(VIOLATION in layer for layer in doc["layers"])


def test_the_cli_lays_tables_out_for_columns_else_full_rows(tmp_path):
    from adapter_factory import write_adapter
    from typer.testing import CliRunner

    from s3lora_cli.cli import app

    adapter = write_adapter(tmp_path / "adapter")
    runner = CliRunner()
    narrow = runner.invoke(app, ["score", str(adapter), "-q"], env={"COLUMNS": "60"}).stdout
    lines = [line for line in narrow.splitlines() if str(adapter) not in line]  # a path is never broken
    assert max(map(len, lines)) <= 60 and "not shown at 60 columns" in narrow
    assert "module: names without their common prefix 'model.layers.'" in narrow
    piped = runner.invoke(app, ["score", str(adapter), "-q"], env={"COLUMNS": ""}).stdout
    assert "model.layers.1.self_attn.v_proj" in piped and "not shown" not in piped and "sigma_sum" in piped
    written = tmp_path / "table.txt"  # a file gets full rows whatever the terminal
    runner.invoke(app, ["score", str(adapter), "-q", "-o", str(written)], env={"COLUMNS": "60"})
    assert written.read_text() == piped
