"""Renderers of a ScoreReport (JSON, Markdown, CSV, the text table) and of the gate's GateResults (JSON, Markdown,
SARIF 2.1.0, the text verdict), laid out for a terminal width when given; pure functions that return text."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

# The JSON report's serialisation lives in document.py; its names are re-exported for the renderers' callers.
from s3lora_cli._version import __version__
from s3lora_cli.document import PRUNED as PRUNED
from s3lora_cli.document import SCHEMA_VERSION, TOOL_NAME, TOP_TAU, VIOLATION
from s3lora_cli.document import finite as _finite
from s3lora_cli.document import layer_dict as layer_dict
from s3lora_cli.document import render_json as render_json
from s3lora_cli.document import report_dict as report_dict
from s3lora_cli.gate import RULE_HELP, GateResult, Rule, Violation
from s3lora_cli.scoring import LayerScore, ScoreReport
from s3lora_cli.selection import LARGE_SELECTION, MAD_TO_SIGMA, Spread, percent, spread
from s3lora_cli.store import AdmitResult, Neighbour, ScanResult, ScanRow, ScanSettings

OUTLIER_Z = 3.5
"""A robust z-score above this stands out (Iglewicz and Hoaglin's cut-off for the modified z-score)."""

MEANING = (
    "SSI (Spectral Sharpness Index) is the share of a layer's update in its single strongest direction: near "
    "1/h when spread evenly over h directions, 1 when it is all one direction. S3LoRA treats a sharply "
    "concentrated update as a safety risk (it can shift the model's outputs unstably and erode its safety "
    "alignment) and prunes the top-tau layers by SSI: a ranking, with no absolute threshold."
)
NEXT_STEPS = (
    "With a high SSI: compare with an approved baseline (s3lora check --baseline DIR --max-increase X), prune "
    "the top-tau (s3lora prune) and evaluate the pruned adapter on your tasks, and review the layers that "
    "stand out (high z)."
)


def _fmt(x: float | None, spec: str = ".6f") -> str:
    return "-" if x is None else format(x, spec)


# --- text tables that fit a width -------------------------------------------------------------------------

ELLIPSIS = "…"
GAP = "  "
MODULE_MIN = 28
"""Module names are shortened (from the left) to no fewer characters than this, or than their longest last
component plus the ellipsis, before the table gives up columns."""


@dataclass(frozen=True)
class Column:
    """A column of a text table. ``drop``: 0 for a column that is always shown, else the order in which
    columns give way when the table is too wide (1 first); ``early`` columns give way before the names are
    shortened, the others after. ``shorten``: "left" keeps a cell's end (module names, paths), "right" its
    start (free text); None: never shortened."""

    header: str
    right: bool = False
    drop: int = 0
    early: bool = False
    shorten: str | None = None


def _cut(text: str, width: int, side: str | None) -> str:
    if len(text) <= width or side is None:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return ELLIPSIS + text[len(text) - width + 1 :] if side == "left" else text[: width - 1] + ELLIPSIS


def _min_width(column: Column, cells: list[str], natural: int) -> int:
    if column.shorten == "left":
        last = max((len(c.rsplit(".", 1)[-1].rsplit("/", 1)[-1]) + 1 for c in cells), default=1)
        return min(natural, max(last, MODULE_MIN, len(column.header)))
    if column.shorten == "right":
        return min(natural, max(12, len(column.header)))
    return natural


def _total(widths: dict[int, int]) -> int:
    return sum(widths.values()) + len(GAP) * (len(widths) - 1)


def _shrunk(
    kept: list[int], natural: list[int], minimum: list[int], columns: Sequence[Column], width: int
) -> dict[int, int]:
    widths = {i: natural[i] for i in kept}
    over = _total(widths) - width
    for i in sorted(kept, key=lambda i: columns[i].shorten != "right"):  # free text first, then names
        if over <= 0:
            break
        take = min(over, widths[i] - minimum[i])
        widths[i] -= take
        over -= take
    return widths


def text_table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None
) -> tuple[list[str], list[str]]:
    """The lines of a table (a header line, then one line per row; columns separated by two spaces) and the
    headers of the columns left out. With ``width`` None every column is shown in full. Otherwise columns give
    way and cells are shortened, in the order ``Column`` describes, until the lines fit ``width`` (or only the
    columns that are always shown are left, at their shortest)."""
    cells = [[row[i] for row in rows] for i in range(len(columns))]
    natural = [max([len(c.header)] + [len(x) for x in cells[i]]) for i, c in enumerate(columns)]
    kept = list(range(len(columns)))
    widths = {i: natural[i] for i in kept}
    if width is not None:
        minimum = [_min_width(c, cells[i], natural[i]) for i, c in enumerate(columns)]
        order = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop)
        for i in order:
            if columns[i].early and _total({k: natural[k] for k in kept}) > width:
                kept.remove(i)
        widths = _shrunk(kept, natural, minimum, columns, width)
        for i in order:
            if not columns[i].early and i in kept and _total(widths) > width:
                kept.remove(i)
                widths = _shrunk(kept, natural, minimum, columns, width)
    lines = []
    for row in [[c.header for c in columns], *rows]:
        parts = []
        for i in kept:
            text = _cut(row[i], widths[i], columns[i].shorten)
            parts.append(text.rjust(widths[i]) if columns[i].right else text.ljust(widths[i]))
        lines.append(GAP.join(parts).rstrip())
    return lines, [columns[i].header for i in range(len(columns)) if i not in kept]


def _wrapped(text: str, width: int | None) -> list[str]:
    if width is None:
        return [text]
    return textwrap.wrap(
        text, width=max(width, 40), subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
    ) or [""]


def common_prefix(modules: Sequence[str]) -> str:
    """The dotted prefix all ``modules`` share (``model.layers.``), never a whole name: each keeps at least its
    last component."""
    if len(modules) < 2:
        return ""
    split = [m.split(".") for m in modules]
    n = 0
    while all(len(parts) > n + 1 for parts in split) and len({parts[n] for parts in split}) == 1:
        n += 1
    return ".".join(split[0][:n]) + "." if n else ""


# --- the score table (score, prune, the ranked layers of check) --------------------------------------------

LAYER_COLUMNS = (
    Column("rank", right=True),
    Column(""),  # the mark: * for top-tau or pruned, ! for a violation
    Column("module", shorten="left"),
    Column("ssi", right=True),
    Column("z", right=True, drop=8),
    Column("fit", right=True, drop=7),
    Column("kind", drop=4, early=True),
    Column("shape", right=True, drop=5, early=True),
    Column("r", right=True, drop=6),
    Column("sigma_1", right=True, drop=3, early=True),
    Column("sigma_sum", right=True, drop=2, early=True),
    Column("notes", drop=1, early=True, shorten="right"),
)
MARK_SYMBOL = {TOP_TAU: "*", PRUNED: "*", VIOLATION: "!"}
CSV_HEADERS = [
    "rank",
    "mark",
    "module",
    "kind",
    "shape",
    "r",
    "ssi",
    "robust_z",
    "fit_rank",
    "components",
    "sigma_1",
    "sigma_sum",
    "notes",
]


def fit_note(score: LayerScore) -> str | None:
    """Why a layer's SSI is 1 by construction: its L1 fit is rank 1 although it took several components."""
    if score.fit_rank != 1 or score.components < 2 or not score.picks:
        return None
    if len({p.b for p in score.picks}) == 1:
        shared = f"all {len(score.picks)} picks share right candidate {score.picks[0].b}"
    elif len({p.a for p in score.picks}) == 1:
        shared = f"all {len(score.picks)} picks share left candidate {score.picks[0].a}"
    else:
        shared = f"picks 2-{len(score.picks)} added no second direction"
    return f"rank-1 fit ({shared}): SSI is 1 by construction"


def _notes(score: LayerScore) -> str:
    note = fit_note(score)
    return "; ".join(([score.error] if score.error else []) + list(score.notes) + ([note] if note else []))


def _fit(score: LayerScore) -> str:
    return "-" if score.fit_rank is None else f"{score.fit_rank}/{score.components}"


def _layer_cells(rank: int, score: LayerScore, mark: str, z: float | None, module: str) -> list[str]:
    shape = "x".join(str(n) for n in score.layer.shape)
    return [
        str(rank),
        mark,
        module,
        _fmt(score.ssi, ".4f"),
        _fmt(z, "+.1f"),
        _fit(score),
        score.layer.kind.value,
        shape,
        str(score.layer.r),
        _fmt(score.sigma_1, ".4g"),
        _fmt(score.sigma_sum, ".4g"),
        _notes(score),
    ]


def _rows(
    report: ScoreReport, marked, mark: str, where: Spread, top: int | None, prefix: str = "", only_marked: bool = False
) -> list[list[str]]:
    rows = []
    for i, s in enumerate(report.layers, start=1):
        if (top is not None and i > top) or (only_marked and s.module not in marked):
            continue
        symbol = MARK_SYMBOL[mark] if s.module in marked else ""
        rows.append(_layer_cells(i, s, symbol, where.robust_z[s.module], s.module[len(prefix) :]))
    return rows


def render_csv(report: ScoreReport, marked=(), mark: str = TOP_TAU) -> str:
    where = spread(report)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([mark if h == "mark" else h for h in CSV_HEADERS])
    for i, s in enumerate(report.layers, start=1):
        shape = "x".join(str(n) for n in s.layer.shape)
        z = where.robust_z[s.module]
        writer.writerow(
            [
                i,
                "yes" if s.module in marked else "",
                s.module,
                s.layer.kind.value,
                shape,
                s.layer.r,
                _fmt(s.ssi, ".4f"),
                _fmt(z, ".4f"),
                "" if s.fit_rank is None else s.fit_rank,
                s.components,
                _fmt(s.sigma_1, ".4g"),
                _fmt(s.sigma_sum, ".4g"),
                _notes(s),
            ]
        )
    return out.getvalue()


def legend(report: ScoreReport, marked, mark: str, tau: int | None = None, selection: str | None = None) -> list[str]:
    """What the marks and columns of the layer table mean (the same sentences under the table and in Markdown)."""
    scored = sum(s.ssi is not None for s in report.layers)
    count = sum(s.module in marked for s in report.layers)
    symbol = MARK_SYMBOL[mark]
    if mark == TOP_TAU:
        line = (
            f"{symbol} top-tau: the {count} highest-SSI layers ({percent(count, scored)} of {scored}), what "
            f"`s3lora prune --tau {tau}` would remove (the paper's action; it ranks, it sets no SSI threshold)."
        )
        if count > LARGE_SELECTION * scored:
            line += " That is more than half of the layers: prune refuses it without --allow-large."
    elif mark == PRUNED:
        line = f"{symbol} pruned: {count} of {scored} layers ({percent(count, scored)}), selected by {selection}."
    else:
        line = f"{symbol} violation: the layer broke a gate rule ({count} of {len(report.layers)} layers)."
    where = spread(report)
    lines = [line]
    if where.mad:
        lines.append(
            f"z: robust z-score of SSI within this adapter, (ssi - median) / ({MAD_TO_SIGMA} MAD), median "
            f"{where.median:.4f}, MAD {where.mad:.4f}; above {OUTLIER_Z:g} stands out."
        )
    else:
        lines.append(
            "z: robust z-score of SSI within this adapter; '-' here: half or more of the layers share one "
            "SSI (MAD 0), so there is no scale to measure against."
        )
    ones = sum(s.fit_rank == 1 and s.components > 1 for s in report.layers)
    lines.append(
        f"fit: rank of the L1 fit / M components; 1/M means S'_2..S'_h are 0, so SSI is 1 by "
        f"construction ({ones} layer(s) here)."
    )
    non_finite = len(report.layers) - scored
    if non_finite:
        lines.append(f"-: {non_finite} layer(s) not scored: non-finite values (NaN or Inf); `check` fails on them.")
    return lines


def render_table(
    report: ScoreReport,
    marked=(),
    mark: str = TOP_TAU,
    *,
    tau: int | None = None,
    selection: str | None = None,
    width: int | None = None,
    top: int | None = None,
    only_marked: bool = False,
) -> str:
    """The ranked layer table as text, for ``width`` columns (None: full rows), with its legend. ``top``
    lists only the first rows; ``only_marked`` only the marked ones."""
    modules = [s.module for s in report.layers]
    prefix = common_prefix(modules) if width is not None else ""
    where = spread(report)
    rows = _rows(report, marked, mark, where, top, prefix, only_marked)
    title = (
        f"s3lora {report.parameters['method']} scores: {report.adapter.path} ({len(report.layers)} LoRA layers, "
        "highest SSI first)"
    )
    lines, hidden = text_table(LAYER_COLUMNS, rows, width)
    out = [*_wrapped(title, width), *lines]
    shown = len(rows)
    if shown < len(report.layers):
        rest = len(report.layers) - shown
        hint = "--verbose lists every layer" if only_marked else "omit --top to list every layer"
        out.append(f"... {rest} more layer(s) not listed; {hint}")
    notes = legend(report, marked, mark, tau, selection)
    if prefix:
        notes.append(f"module: names without their common prefix '{prefix}'.")
    if hidden:
        notes.append(
            f"not shown at {width} columns: {', '.join(hidden)} (a wider terminal, or --format json, shows them)."
        )
    for note in notes:
        out += _wrapped(note, width)
    return "\n".join(out) + "\n"


def render_markdown(
    report: ScoreReport,
    marked=(),
    tau: int | None = None,
    mark: str = TOP_TAU,
    *,
    selection: str | None = None,
    top: int | None = None,
) -> str:
    a = report.adapter
    headers = [h for h in (c.header for c in LAYER_COLUMNS)]
    headers[1] = mark.replace("_", "-")
    lines = [
        f"### s3lora: {a.path}",
        "",
        summary_line(report, marked, tau, mark),
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if c.right else "---" for c in LAYER_COLUMNS) + "|",
    ]
    where = spread(report)
    for row in _rows(report, marked, mark, where, top):
        row[2] = f"`{row[2]}`"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    if top is not None and top < len(report.layers):
        lines.append(f"\n{len(report.layers) - top} more layer(s) not listed.")
    lines.append("")
    lines += [f"- {note}" for note in legend(report, marked, mark, tau, selection)]
    return "\n".join(lines) + "\n"


def summary_line(report: ScoreReport, marked=(), tau: int | None = None, mark: str = TOP_TAU) -> str:
    scored = [s for s in report.layers if s.ssi is not None]
    non_finite = len(report.layers) - len(scored)
    parts = [f"{len(scored)} LoRA layers scored with {report.parameters['method']} on {report.device}"]
    if scored:
        where = spread(report)
        parts.append(f"max SSI {scored[0].ssi:.4f} ({scored[0].module}), median {where.median:.4f}")
        outliers = sum((z or 0.0) > OUTLIER_Z for z in where.robust_z.values())
        if where.mad:
            parts.append(f"{outliers} layer(s) stand out (z > {OUTLIER_Z:g})")
    if mark == TOP_TAU and tau is not None:
        count = sum(s.module in marked for s in report.layers)
        parts.append(f"top-tau: {count} of {len(scored)} layers ({percent(count, len(scored))})")
    if non_finite:
        parts.append(f"{non_finite} not scored (non-finite values)")
    if report.not_analysed:
        parts.append(f"{len(report.not_analysed)} non-LoRA tensors not analysed")
    return "; ".join(parts)


def score_summary(report: ScoreReport, marked=(), tau: int | None = None) -> list[str]:
    """The lines ``score`` writes to stderr: the summary, what SSI means, and what to do with a high value."""
    return [summary_line(report, marked, tau), MEANING, NEXT_STEPS]


# --- the gate (s3lora check): JSON, Markdown, SARIF 2.1.0 and the Rich verdict -------------------------------

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"


def _fmt_value(v: Violation) -> str:
    if v.value is None:
        return "NaN/Inf" if v.rule is Rule.NON_FINITE else "-"
    return f"{v.value:+.4f}" if v.rule is Rule.MAX_INCREASE else f"{v.value:.4f}"


def _fmt_limit(limit: float | None) -> str:
    return "-" if limit is None else f"{limit:g}"


def _verdict_word(v: Violation, result: GateResult) -> str:
    """'fails', 'tolerated' (within max-violations) or 'reported' (new or missing layers without strict-layers)."""
    if v.fails:
        return "fails"
    outcome = next(o for o in result.rules if o.rule is v.rule)
    return "reported" if outcome.allowed is None else "tolerated"


def _allowed_text(allowed: int | None) -> str:
    return "any" if allowed is None else str(allowed)


def gate_dict(result: GateResult) -> dict[str, Any]:
    """The ``gate`` object of ``check --format json`` (documented in README.md)."""
    doc: dict[str, Any] = {
        "passed": result.passed,
        "rules": [
            {
                "rule": o.rule.value,
                "limit": _finite(o.limit),
                "allowed": o.allowed,
                "violations": o.violations,
                "passed": o.passed,
                "source": o.source,
            }
            for o in result.rules
        ],
        "violations": [
            {
                "module": v.module,
                "rule": v.rule.value,
                "value": _finite(v.value),
                "limit": _finite(v.limit),
                "ssi": _finite(v.ssi),
                "baseline_ssi": _finite(v.baseline_ssi),
                "fails": v.fails,
                "message": v.message,
            }
            for v in result.violations
        ],
        "baseline": None,
    }
    if result.baseline is not None:
        b = result.baseline.adapter
        doc["baseline"] = {
            "path": b.path,
            "sha256": b.sha256,
            "new_layers": sorted(result.new_layers),
            "missing_layers": sorted(result.missing_layers),
            "changes": [
                {
                    "module": c.module,
                    "ssi": _finite(c.ssi),
                    "baseline_ssi": _finite(c.baseline_ssi),
                    "increase": _finite(c.increase),
                }
                for c in result.changes
            ],
        }
    return doc


def check_dict(results: tuple[GateResult, ...] | list[GateResult]) -> dict[str, Any]:
    """``check --format json``: for one adapter, its score report (as ``score --format json``) plus ``gate``;
    for several, {schema_version, tool, passed, adapters: [that document for each adapter]}."""
    docs = []
    for result in results:
        docs.append({**report_dict(result.report, _violating(result), mark=VIOLATION), "gate": gate_dict(result)})
    if len(docs) == 1:
        return docs[0]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": results[0].report.tool_version},
        "passed": all(r.passed for r in results),
        "adapters": docs,
    }


def _violating(result: GateResult) -> set[str]:
    """The candidate's modules listed among the violations (a missing layer is not one of its modules)."""
    return {v.module for v in result.violations if v.rule is not Rule.MISSING_LAYER}


def _rule_text(o) -> str:
    """A rule as applied, e.g. 'max-ssi 0.6: 2 violations, 1 allowed' or 'non-finite: 0 violations'."""
    limit = "" if o.limit is None else f" {o.limit:g}"
    allowed = "" if not o.allowed else f", {o.allowed} allowed"
    return f"{o.rule.value}{limit}: {o.violations} violation{'' if o.violations == 1 else 's'}{allowed}"


def gate_summary_line(result: GateResult) -> str:
    """One line for stderr and the verdict, e.g. 'FAILED adapters/new: 2 layer(s) fail the gate (max-ssi 0.6:
    2 violations; non-finite: 0 violations)'."""
    failing = result.failing
    word = "passed" if result.passed else "FAILED"
    rules = "; ".join(_rule_text(o) for o in result.rules if o.allowed is not None)
    if failing:
        return f"{word} {result.report.adapter.path}: {len(failing)} layer(s) fail the gate ({rules})"
    others = len(result.violations)
    extra = f", {others} violation(s) tolerated or reported" if others else ""
    return f"{word} {result.report.adapter.path}: no layer fails the gate{extra} ({rules})"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_gate_markdown(results: tuple[GateResult, ...] | list[GateResult]) -> str:
    """A short Markdown report for $GITHUB_STEP_SUMMARY or a pull-request comment: the overall verdict, then
    per adapter its rules, its violating layers and (folded) all its layers by SSI."""
    failed = [r for r in results if not r.passed]
    title = "passed" if not failed else "failed"
    lines = [f"### s3lora check: {title}", ""]
    if len(results) == 1:
        lines.append(f"The adapter {'failed' if failed else 'passed'} the gate.")
    else:
        lines.append(
            f"{len(failed)} of {len(results)} adapters failed the gate."
            if failed
            else f"All {len(results)} adapters passed the gate."
        )
    for result in results:
        mark = "✅" if result.passed else "❌"
        lines += ["", f"#### {mark} `{_md(result.report.adapter.path)}`: {'passed' if result.passed else 'failed'}", ""]
        lines += ["| rule | limit | allowed | violations | result | set by |", "|---|---:|---:|---:|---|---|"]
        for o in result.rules:
            lines.append(
                f"| {o.rule.value} | {_fmt_limit(o.limit)} | {_allowed_text(o.allowed)} | {o.violations} "
                f"| {'passed' if o.passed else '**failed**'} | {_md(o.source)} |"
            )
        if result.violations:
            lines += ["", "Violations:", "", "| layer | rule | value | limit | verdict |", "|---|---|---:|---:|---|"]
            for v in result.violations:
                lines.append(
                    f"| `{_md(v.module)}` | {v.rule.value} | {_fmt_value(v)} | {_fmt_limit(v.limit)} "
                    f"| {_verdict_word(v, result)} |"
                )
        if result.baseline is not None:
            lines += [
                "",
                f"Compared with `{_md(result.baseline.adapter.path)}` by module name: "
                f"{len(result.new_layers)} new layer(s), {len(result.missing_layers)} missing.",
            ]
        lines += ["", f"<details><summary>All {len(result.report.layers)} layers by SSI</summary>", ""]
        lines += _ranked_markdown(result)
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _ranked_markdown(result: GateResult) -> list[str]:
    base = {c.module: c for c in result.changes}
    severity = {"fails": 0, "tolerated": 1, "reported": 2}
    verdicts: dict[str, str] = {}
    for v in result.violations:  # the worst verdict among each module's violations
        word = _verdict_word(v, result)
        if severity[word] < severity.get(verdicts.get(v.module, ""), 3):
            verdicts[v.module] = word
    header = ["rank", "module", "ssi"] + (["baseline", "change"] if result.baseline is not None else [])
    header.append("violation")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if h in ("module", "violation") else "---:" for h in header) + "|",
    ]
    for i, s in enumerate(result.report.layers, start=1):
        row = [str(i), f"`{_md(s.module)}`", _fmt(s.ssi, ".4f")]
        if result.baseline is not None:
            c = base.get(s.module)
            row += [_fmt(c.baseline_ssi if c else None, ".4f"), _fmt(c.increase if c else None, "+.4f")]
        row.append(verdicts.get(s.module, ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _sarif_uri(path: str, root: Path | None) -> tuple[str, str | None]:
    """(uri, uriBaseId) of a file: relative to ``root`` (the repository root in CI) when it lies under it."""
    p = Path(path)
    if p.is_absolute() and root is not None:
        try:
            p = p.relative_to(root)
        except ValueError:
            pass
    if p.is_absolute():
        return p.as_uri(), None
    return quote(str(PurePosixPath(*p.parts))), "%SRCROOT%"


def _sarif_rule(rule: Rule) -> dict[str, Any]:
    name = "".join(part.capitalize() for part in rule.value.split("-"))
    return {
        "id": rule.value,
        "name": name,
        "shortDescription": {"text": RULE_HELP[rule].split(";")[0].split(" (")[0].rstrip(".") + "."},
        "fullDescription": {"text": RULE_HELP[rule]},
        "help": {"text": RULE_HELP[rule] + " Layers are scored with S3LoRA's MAS-SVD Spectral Sharpness Index."},
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["lora", "s3lora"]},
    }


def sarif_dict(results: tuple[GateResult, ...] | list[GateResult], root: Path | None = None) -> dict[str, Any]:
    """SARIF 2.1.0: one run, one result per violating layer, located in the adapter's weights file (relative to
    ``root`` when under it) with the module as the logical location. level: error when the layer fails the
    gate, warning when max-violations tolerates it, note for a new or missing layer without strict-layers."""
    rules = list(Rule)
    out = []
    for result in results:
        a = result.report.adapter
        uri, base = _sarif_uri(a.weights_file, root)
        artifact = {"uri": uri, **({"uriBaseId": base} if base else {})}
        for v in result.violations:
            verdict = _verdict_word(v, result)
            out.append(
                {
                    "ruleId": v.rule.value,
                    "ruleIndex": rules.index(v.rule),
                    "level": {"fails": "error", "tolerated": "warning", "reported": "note"}[verdict],
                    "message": {"text": f"{v.rule.value} violation ({verdict}): {v.module} ({a.path}): {v.message}"},
                    "locations": [
                        {
                            "physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}},
                            "logicalLocations": [
                                {"name": v.module.rsplit(".", 1)[-1], "fullyQualifiedName": v.module, "kind": "module"}
                            ],
                        }
                    ],
                    "partialFingerprints": {"s3loraLayer/v1": f"{a.path}:{v.module}:{v.rule.value}"},
                    "properties": {
                        "adapter": a.path,
                        "module": v.module,
                        "value": _finite(v.value),
                        "limit": _finite(v.limit),
                        "ssi": _finite(v.ssi),
                        "baseline_ssi": _finite(v.baseline_ssi),
                        "verdict": verdict,
                    },
                }
            )
    version = results[0].report.tool_version if results else ""
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {"driver": {"name": TOOL_NAME, "version": version, "rules": [_sarif_rule(r) for r in rules]}},
                "results": out,
                "properties": {"passed": all(r.passed for r in results)},
            }
        ],
    }


RULE_COLUMNS = (
    Column("rule"),
    Column("limit", right=True),
    Column("allowed", right=True),
    Column("violations", right=True),
    Column("result"),
    Column("set by", shorten="left"),
)
VIOLATION_COLUMNS = (
    Column("layer", shorten="left"),
    Column("rule"),
    Column("value", right=True),
    Column("limit", right=True),
    Column("verdict"),
    Column("detail", drop=1, shorten="right"),
)


def render_gate_text(result: GateResult, width: int | None = None, verbose: bool = False) -> str:
    """The verdict, the rules and the violations; then every layer ranked by SSI with ``verbose``, else only the
    layers that broke a rule (which the violations already list, so none)."""
    out = _wrapped(gate_summary_line(result), width)
    rule_rows = [
        [
            o.rule.value,
            _fmt_limit(o.limit),
            _allowed_text(o.allowed),
            str(o.violations),
            "passed" if o.passed else "FAILED",
            o.source,
        ]
        for o in result.rules
    ]
    out += text_table(RULE_COLUMNS, rule_rows, width)[0]
    if result.violations:
        rows = [
            [v.module, v.rule.value, _fmt_value(v), _fmt_limit(v.limit), _verdict_word(v, result), v.message]
            for v in result.violations
        ]
        out += ["", *text_table(VIOLATION_COLUMNS, rows, width)[0]]
    if result.baseline is not None:
        out += [
            "",
            f"compared with {result.baseline.adapter.path} by module name: "
            f"{len(result.new_layers)} new layer(s), {len(result.missing_layers)} missing",
        ]
    if verbose:
        out += ["", render_table(result.report, _violating(result), VIOLATION, width=width).rstrip("\n")]
    else:
        out.append(f"({len(result.report.layers)} layers scored; --verbose lists them all, ranked by SSI)")
    return "\n".join(out) + "\n"


# --- adapter stores (s3lora scan, s3lora admit): JSON, JSON lines and the Rich tables -----------------------


def _neighbour_dict(n: Neighbour) -> dict[str, Any]:
    return {"path": n.path, "cosine": _finite(n.cosine), "shared_modules": n.shared_modules, "duplicate": n.duplicate}


def scan_row_dict(row: ScanRow, similar: bool = False) -> dict[str, Any]:
    """One adapter of ``scan --format json|jsonl`` (documented in README.md); ``neighbours`` is null unless
    ``similar``."""
    return {
        "path": row.path,
        "verdict": row.verdict,
        "sha256": row.sha256,
        "max_ssi": _finite(row.max_ssi),
        "over_threshold": row.over_threshold,
        "layers": row.layers,
        "scored": row.scored,
        "top_layers": [{"module": t.module, "ssi": _finite(t.ssi)} for t in row.top_layers],
        "failing": list(row.failing),
        "cached": row.cached,
        "error": row.error,
        "neighbours": [_neighbour_dict(n) for n in row.neighbours] if similar else None,
    }


def render_jsonl_line(doc: dict[str, Any]) -> str:
    return json.dumps(doc, allow_nan=False) + "\n"


def _scan_parameters(settings: ScanSettings) -> dict[str, Any]:
    o = settings.options
    policy = settings.policy
    return {
        "method": o.method.value,
        "components": o.components,
        "top_h": o.top_h,
        "dtype": o.dtype,
        "max_ssi": None if policy is None else policy.max_ssi,
        "max_violations": None if policy is None else policy.max_violations,
        "max_increase": None if policy is None else policy.max_increase,
        "baseline": None if policy is None or policy.baseline is None else str(policy.baseline),
    }


def scan_summary(rows: tuple[ScanRow, ...] | list[ScanRow]) -> dict[str, int]:
    verdicts = [r.verdict for r in rows]
    return {
        "adapters": len(rows),
        "passed": verdicts.count("passed"),
        "failed": verdicts.count("failed"),
        "errors": verdicts.count("error"),
        "cached": sum(r.cached for r in rows),
        "with_duplicates": sum(any(n.duplicate for n in r.neighbours) for r in rows),
    }


def scan_dict(result: ScanResult, similar: bool = False) -> dict[str, Any]:
    """``scan --format json``: the store, the parameters, a summary and the rows ranked by risk."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "store": str(result.root),
        "parameters": _scan_parameters(result.settings),
        "summary": scan_summary(result.rows),
        "adapters": [scan_row_dict(r, similar) for r in result.rows],
    }


def scan_summary_line(rows: tuple[ScanRow, ...] | list[ScanRow], cache_dir: Path | None = None) -> str:
    s = scan_summary(rows)
    parts = [f"{s['adapters']} adapter(s) scanned"]
    if s["passed"] or s["failed"]:
        parts.append(f"{s['failed']} failed the gate, {s['passed']} passed")
    if s["errors"]:
        parts.append(f"{s['errors']} could not be read")
    if cache_dir is not None:
        parts.append(f"{s['cached']} from the cache in {cache_dir}")
    if s["with_duplicates"]:
        parts.append(f"{s['with_duplicates']} with near-duplicates")
    return "; ".join(parts)


def _neighbours_text(row: ScanRow) -> str:
    return ", ".join(f"{n.path} {n.cosine:.3f}{' DUP' if n.duplicate else ''}" for n in row.neighbours)


def render_scan_table(result: ScanResult, similar: bool = False, width: int | None = None) -> str:
    """The store's adapters ranked by risk: verdict, max SSI, layers over the threshold, the top layers."""
    threshold = None if result.settings.policy is None else result.settings.policy.max_ssi
    over = "over" if threshold is None else f"> {threshold:g}"
    columns = [
        Column("rank", right=True),
        Column("adapter", shorten="left"),
        Column("verdict"),
        Column("max ssi", right=True),
        Column(over, right=True, drop=3),
        Column("layers", right=True, drop=4),
        Column("top layers", drop=1, shorten="right"),
    ]
    columns += [Column("nearest (cosine)", drop=2, shorten="right")] if similar else []
    columns += [Column("detail", drop=5, shorten="right")]
    rows = []
    for i, row in enumerate(result.rows, start=1):
        top = ", ".join(f"{t.module} {_fmt(t.ssi, '.3f')}" for t in row.top_layers)
        detail = row.error or "; ".join(row.failing[:3]) + (" ..." if len(row.failing) > 3 else "")
        cells = [
            str(i),
            row.path,
            row.verdict,
            _fmt(row.max_ssi, ".4f"),
            "-" if row.over_threshold is None else str(row.over_threshold),
            str(row.layers),
            top,
        ]
        cells += [_neighbours_text(row)] if similar else []
        cells += [detail]
        rows.append(cells)
    lines, hidden = text_table(columns, rows, width)
    out = [*_wrapped(f"s3lora scan: {result.root}", width), *lines]
    if hidden:
        out += _wrapped(
            f"not shown at {width} columns: {', '.join(hidden)} (a wider terminal, or --format json, shows them).",
            width,
        )
    return "\n".join(out) + "\n"


def admit_dict(result: AdmitResult) -> dict[str, Any]:
    """``admit --format json``: the ``check --format json`` document plus an ``admit`` object."""
    return {
        **check_dict((result.gate,)),
        "admit": {
            "admitted": result.admitted,
            "name": result.name,
            "sha256": result.sha256,
            "key": result.key,
            "destination": str(result.destination),
            "already_present": result.already_present,
            "audit_log": str(result.audit_log),
            "neighbours": [_neighbour_dict(n) for n in result.neighbours],
            "broken": list(result.broken),
            "warnings": list(result.warnings),
        },
    }


def admit_summary_line(result: AdmitResult) -> str:
    where = "already in" if result.already_present else "copied to"
    word = "admitted" if result.admitted else "REFUSED"
    dup = [n for n in result.neighbours if n.duplicate]
    extra = f"; near-duplicate of {', '.join(f'{n.path} ({n.cosine:.3f})' for n in dup)}" if dup else ""
    return f"{word} {result.gate.report.adapter.path}: {where} {result.destination}{extra}"


def render_admit_text(result: AdmitResult, width: int | None = None, verbose: bool = False) -> str:
    """The decision, the gate's verdict, and the nearest adapters of the store."""
    out = [*_wrapped(admit_summary_line(result), width), render_gate_text(result.gate, width, verbose).rstrip("\n")]
    if result.neighbours:
        columns = (
            Column("adapter", shorten="left"),
            Column("cosine", right=True),
            Column("shared modules", right=True),
            Column("duplicate"),
        )
        rows = [
            [n.path, f"{n.cosine:.4f}", str(n.shared_modules), "yes" if n.duplicate else ""] for n in result.neighbours
        ]
        out += ["", "nearest adapters in the store", *text_table(columns, rows, width)[0]]
    return "\n".join(out) + "\n"
