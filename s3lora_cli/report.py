"""Renderers of a ScoreReport: the JSON document, Markdown, CSV and the Rich table; pure functions."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich.table import Table

from s3lora_cli.scoring import LayerScore, ScoreReport

SCHEMA_VERSION = 1
TOOL_NAME = "s3lora"


def _finite(x: float | None, digits: int = 12) -> float | None:
    """A float rounded to ``digits`` significant digits, so that the last bits of a platform's BLAS do not
    change the document; None stays None (JSON null)."""
    return None if x is None else float(format(float(x), f".{digits}g"))


def layer_dict(rank: int, score: LayerScore, flagged: bool) -> dict[str, Any]:
    layer = score.layer
    return {
        "rank": rank,
        "module": layer.module,
        "kind": layer.kind.value,
        "shape": list(layer.shape),
        "r": layer.r,
        "lora_alpha": layer.lora_alpha,
        "scaling": layer.scaling,
        "dtype": layer.dtype,
        "ssi": _finite(score.ssi),
        "sigma": [_finite(s) for s in score.sigma],
        "sigma_1": _finite(score.sigma_1),
        "sigma_sum": _finite(score.sigma_sum),
        "components": score.components,
        "top_h": score.top_h,
        "picks": [{"a": p.a, "b": p.b, "delta": _finite(p.delta)} for p in score.picks],
        "flagged": flagged,
        "notes": list(score.notes),
        "error": score.error,
    }


def report_dict(report: ScoreReport, flagged: set[str] | tuple = (), tau: int | None = None) -> dict[str, Any]:
    """The JSON document of a report (schema_version 1, documented in README.md)."""
    a = report.adapter
    scored = [s for s in report.layers if s.ssi is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": report.tool_version},
        "adapter": {
            "path": a.path,
            "weights_file": a.weights_file,
            "sha256": a.sha256,
            "format": a.format,
            "base_model_name_or_path": a.base_model_name_or_path,
            "peft_type": a.peft_type,
            "r": a.r,
            "lora_alpha": a.lora_alpha,
            "use_rslora": a.use_rslora,
            "use_dora": a.use_dora,
            "target_modules": sorted(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules,
        },
        "parameters": {**report.parameters, "tau": tau},
        "summary": {
            "layers": len(report.layers),
            "scored": len(scored),
            "failed": len(report.layers) - len(scored),
            "max_ssi": _finite(scored[0].ssi) if scored else None,
            "flagged": [s.module for s in report.layers if s.module in flagged],
        },
        "layers": [layer_dict(i, s, s.module in flagged) for i, s in enumerate(report.layers, start=1)],
        "not_analysed": [
            {"key": t.key, "module": t.module, "shape": list(t.shape), "reason": t.reason} for t in report.not_analysed
        ],
    }


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, allow_nan=False, indent=2) + "\n"


def _fmt(x: float | None, spec: str = ".6f") -> str:
    return "-" if x is None else format(x, spec)


def _rows(report: ScoreReport, flagged) -> list[list[str]]:
    rows = []
    for i, s in enumerate(report.layers, start=1):
        shape = "x".join(str(n) for n in s.layer.shape)
        notes = "; ".join(([s.error] if s.error else []) + list(s.notes))
        rows.append([str(i), "*" if s.module in flagged else "", s.module, s.layer.kind.value, shape, str(s.layer.r),
                     _fmt(s.ssi, ".4f"), _fmt(s.sigma_1, ".4g"), _fmt(s.sigma_sum, ".4g"), notes])
    return rows


HEADERS = ["rank", "flag", "module", "kind", "shape", "r", "ssi", "sigma_1", "sigma_sum", "notes"]


def render_csv(report: ScoreReport, flagged=()) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADERS)
    writer.writerows(_rows(report, flagged))
    return out.getvalue()


def render_markdown(report: ScoreReport, flagged=(), tau: int | None = None) -> str:
    a = report.adapter
    lines = [
        f"### s3lora: {a.path}",
        "",
        f"{summary_line(report, flagged, tau)}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---:" if h in ("rank", "r", "ssi", "sigma_1", "sigma_sum") else "---" for h in HEADERS) + "|",
    ]
    for row in _rows(report, flagged):
        row[2] = f"`{row[2]}`"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def render_table(report: ScoreReport, flagged=(), tau: int | None = None) -> Table:
    title = f"S3LoRA {report.parameters['method']} scores: {report.adapter.path}"
    caption = f"* = in the top-{tau} by SSI (would be pruned with --tau {tau})" if tau is not None else None
    table = Table(title=title, caption=caption)
    for h in HEADERS:
        justify = "right" if h in ("rank", "r", "ssi", "sigma_1", "sigma_sum") else "left"
        table.add_column("" if h == "flag" else h, justify=justify, no_wrap=h != "notes", overflow="fold")
    for row in _rows(report, flagged):
        style = "bold red" if row[1] else None
        table.add_row(*row, style=style)
    return table


def summary_line(report: ScoreReport, flagged=(), tau: int | None = None) -> str:
    scored = [s for s in report.layers if s.ssi is not None]
    failed = len(report.layers) - len(scored)
    parts = [f"{len(scored)} LoRA layers scored with {report.parameters['method']} on {report.device}"]
    if scored:
        parts.append(f"max SSI {scored[0].ssi:.4f} ({scored[0].module})")
    if tau is not None:
        parts.append(f"{len(flagged)} in the top-{tau}")
    if failed:
        parts.append(f"{failed} not scored (non-finite values)")
    if report.not_analysed:
        parts.append(f"{len(report.not_analysed)} non-LoRA tensors not analysed")
    return "; ".join(parts)
