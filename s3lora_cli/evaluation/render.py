"""Renderers of an EvalResult: the JSON document (eval schema_version 1), Markdown, CSV, the Rich table and the
PNG of the utility curve of a tau sweep (matplotlib, when installed); pure functions of the result."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from s3lora_cli.evaluation.runner import EvalResult, VariantResult
from s3lora_cli.evaluation.variants import VariantKind

SCHEMA_VERSION = 1
TOOL_NAME = "s3lora"

COLUMNS = ("variant", "pruned", "exact_match", "contains", "nll", "kl", "agreement", "refusal_rate")
"""The columns of the table, Markdown and CSV, one row per variant."""


def _round(x: float | None, digits: int = 12) -> float | None:
    return None if x is None else float(format(float(x), f".{digits}g"))


def variant_dict(result: VariantResult) -> dict[str, Any]:
    v, s = result.variant, result.scores
    return {
        "name": v.name,
        "kind": v.kind.value,
        "tau": v.tau,
        "selection": v.selection,
        "pruned_layers": len(v.pruned) if v.kind is not VariantKind.PRUNED_FILE else None,
        "pruned": list(v.pruned),
        "exact_match": _round(s.exact_match),
        "contains": _round(s.contains),
        "nll": _round(s.nll),
        "kl": _round(s.kl),
        "agreement": _round(s.agreement),
        "refusal_rate": _round(s.refusal_rate),
        "seconds": round(result.seconds, 3),
    }


def _task_file_dict(task_file) -> dict[str, Any] | None:
    if task_file is None:
        return None
    return {
        "path": str(task_file.path),
        "count": len(task_file.tasks),
        "skipped": [{"line": b.line, "reason": b.reason} for b in task_file.skipped],
    }


def eval_dict(result: EvalResult) -> dict[str, Any]:
    """The JSON document of ``s3lora eval --format json`` (documented in docs/eval.md)."""
    o = result.options
    selection = o.selection.as_dict() if o.selection is not None else None
    refusals = _task_file_dict(result.refusals)
    if refusals is not None:
        refusals["markers"] = list(o.refusal_markers)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": result.tool_version},
        "base": result.base,
        "adapter": {
            "path": result.adapter,
            "format": result.adapter_format,
            "sha256": result.adapter_sha256,
            "layers": result.adapter_layers,
        },
        "tasks": _task_file_dict(result.tasks),
        "refusals": refusals,
        "parameters": {
            "selection": selection,
            "pruned": str(o.pruned) if o.pruned is not None else None,
            "sweep_tau": list(o.sweep_tau),
            "method": o.score.method.value,
            "max_new_tokens": o.max_new_tokens,
            "batch_size": o.batch_size,
            "chat_template": o.chat_template,
            "limit": o.limit,
            "device": result.device,
        },
        "variants": [variant_dict(v) for v in result.variants],
        "seconds": round(result.seconds, 3),
    }


def render_json(result: EvalResult) -> str:
    return json.dumps(eval_dict(result), allow_nan=False, indent=2) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _rows(result: EvalResult) -> list[list[str]]:
    rows = []
    for r in result.variants:
        v, s = r.variant, r.scores
        pruned = "-" if v.kind is VariantKind.PRUNED_FILE else str(len(v.pruned))
        rows.append(
            [
                v.name,
                pruned,
                _pct(s.exact_match),
                _pct(s.contains),
                f"{s.nll:.4f}",
                f"{s.kl:.4f}",
                _pct(s.agreement),
                _pct(s.refusal_rate),
            ]
        )
    return rows


def render_csv(result: EvalResult) -> str:
    """One row per variant, the metrics as plain numbers (shares in [0, 1])."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in result.variants:
        d = variant_dict(r)
        writer.writerow(
            [
                d["name"],
                "" if d["pruned_layers"] is None else d["pruned_layers"],
                *("" if d[c] is None else d[c] for c in COLUMNS[2:]),
            ]
        )
    return out.getvalue()


def summary_line(result: EvalResult) -> str:
    skipped = len(result.tasks.skipped) + (len(result.refusals.skipped) if result.refusals else 0)
    refusals = f" and {len(result.refusals.tasks)} refusal prompts" if result.refusals else ""
    return (
        f"{len(result.tasks.tasks)} tasks{refusals} x {len(result.variants)} variants on {result.device} in "
        f"{result.seconds:.1f} s" + (f"; {skipped} bad line(s) skipped" if skipped else "")
    )


def render_markdown(result: EvalResult) -> str:
    headers = [
        "variant",
        "pruned layers",
        "exact match",
        "contains",
        "NLL/token",
        "KL vs adapter",
        "top-1 agreement",
        "refusals",
    ]
    lines = [
        f"### s3lora eval: {result.adapter} on {result.base}",
        "",
        summary_line(result),
        "",
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 1),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(result)]
    return "\n".join(lines) + "\n"


def render_table(result: EvalResult) -> Table:
    table = Table(title=f"s3lora eval: {result.adapter} on {result.base}", caption=summary_line(result))
    for name in ("variant", "pruned", "exact", "contains", "NLL/token", "KL vs adapter", "agreement", "refusals"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for row in _rows(result):
        table.add_row(*row)
    return table


def sweep_points(result: EvalResult) -> list[VariantResult]:
    """The sweep's variants by tau, with the adapter as tau = 0 when the sweep does not hold 0."""
    points = [r for r in result.variants if r.variant.name.startswith("tau=")]
    if points and not any(r.variant.tau == 0 for r in points):
        points += [r for r in result.variants if r.variant.kind is VariantKind.ADAPTER]
    return sorted(points, key=lambda r: len(r.variant.pruned))


def render_plot(result: EvalResult) -> bytes:
    """The utility curve of the tau sweep as a PNG: exact match, contains and top-1 agreement by
    the number of layers pruned, the base model's exact match and contains as dashed lines. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = sweep_points(result)
    base = next(r for r in result.variants if r.variant.kind is VariantKind.BASE)
    x = [len(r.variant.pruned) for r in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for attr, label, colour in (
        ("exact_match", "exact match", "C0"),
        ("contains", "contains", "C1"),
        ("agreement", "top-1 agreement with the adapter", "C2"),
    ):
        ax.plot(x, [100 * getattr(r.scores, attr) for r in points], marker="o", color=colour, label=label)
    ax.axhline(100 * base.scores.exact_match, color="C0", linestyle="--", linewidth=1, label="base: exact match")
    ax.axhline(100 * base.scores.contains, color="C1", linestyle=":", linewidth=1, label="base: contains")
    ax.set_xlabel("layers pruned (top-tau by SSI)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"s3lora eval: {Path(result.adapter).name}, {len(result.tasks.tasks)} tasks", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": f"{TOOL_NAME} {result.tool_version}"})
    plt.close(fig)
    return out.getvalue()
