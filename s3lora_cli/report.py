"""Renderers of a ScoreReport (JSON, Markdown, CSV, the Rich table) and of the gate's GateResults (JSON, Markdown,
SARIF 2.1.0, the Rich verdict); pure functions."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from rich.console import Group
from rich.table import Table
from rich.text import Text

from s3lora_cli.gate import RULE_HELP, GateResult, Rule, Violation
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
    """'fails', 'tolerated' (within max-flagged) or 'reported' (new or missing layers without strict-layers)."""
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
            {"rule": o.rule.value, "limit": _finite(o.limit), "allowed": o.allowed, "violations": o.violations,
             "passed": o.passed, "source": o.source}
            for o in result.rules
        ],
        "violations": [
            {"module": v.module, "rule": v.rule.value, "value": _finite(v.value), "limit": _finite(v.limit),
             "ssi": _finite(v.ssi), "baseline_ssi": _finite(v.baseline_ssi), "fails": v.fails, "message": v.message}
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
            "changes": [{"module": c.module, "ssi": _finite(c.ssi), "baseline_ssi": _finite(c.baseline_ssi),
                         "increase": _finite(c.increase)} for c in result.changes],
        }
    return doc


def check_dict(results: tuple[GateResult, ...] | list[GateResult]) -> dict[str, Any]:
    """``check --format json``: for one adapter, its score report (as ``score --format json``) plus ``gate``;
    for several, {schema_version, tool, passed, adapters: [that document for each adapter]}."""
    docs = []
    for result in results:
        docs.append({**report_dict(result.report, _violating(result)), "gate": gate_dict(result)})
    if len(docs) == 1:
        return docs[0]
    return {"schema_version": SCHEMA_VERSION, "tool": {"name": TOOL_NAME, "version": results[0].report.tool_version},
            "passed": all(r.passed for r in results), "adapters": docs}


def _violating(result: GateResult) -> set[str]:
    """The candidate's modules listed among the violations (a missing layer is not one of its modules)."""
    return {v.module for v in result.violations if v.rule is not Rule.MISSING_LAYER}


def _rule_text(o) -> str:
    limit = "" if o.limit is None else f" {o.limit:g}"
    allowed = "" if not o.allowed else f", {o.allowed} allowed"
    return f"{o.rule.value}{limit}{allowed}"


def gate_summary_line(result: GateResult) -> str:
    """One line for stderr and the table verdict, e.g. 'FAILED adapters/new: 2 violations of max-ssi 0.6'."""
    failing = result.failing
    word = "passed" if result.passed else "FAILED"
    rules = "; ".join(_rule_text(o) for o in result.rules if o.allowed is not None)
    if failing:
        return f"{word} {result.report.adapter.path}: {len(failing)} failing layer(s) ({rules})"
    others = len(result.violations)
    extra = f", {others} tolerated or reported" if others else ""
    return f"{word} {result.report.adapter.path}: no failing layer{extra} ({rules})"


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
        lines.append(f"{len(failed)} of {len(results)} adapters failed the gate." if failed
                     else f"All {len(results)} adapters passed the gate.")
    for result in results:
        mark = "✅" if result.passed else "❌"
        lines += ["", f"#### {mark} `{_md(result.report.adapter.path)}`: {'passed' if result.passed else 'failed'}", ""]
        lines += ["| rule | limit | allowed | found | result | set by |", "|---|---:|---:|---:|---|---|"]
        for o in result.rules:
            lines.append(f"| {o.rule.value} | {_fmt_limit(o.limit)} | {_allowed_text(o.allowed)} | {o.violations} "
                         f"| {'passed' if o.passed else '**failed**'} | {_md(o.source)} |")
        if result.violations:
            lines += ["", "| layer | rule | value | limit | verdict |", "|---|---|---:|---:|---|"]
            for v in result.violations:
                lines.append(f"| `{_md(v.module)}` | {v.rule.value} | {_fmt_value(v)} | {_fmt_limit(v.limit)} "
                             f"| {_verdict_word(v, result)} |")
        if result.baseline is not None:
            lines += ["", f"Compared with `{_md(result.baseline.adapter.path)}` by module name: "
                      f"{len(result.new_layers)} new layer(s), {len(result.missing_layers)} missing."]
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
    header = ["rank", "module", "ssi"] + (["baseline", "change"] if result.baseline is not None else []) + ["gate"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in ("module", "gate") else "---:" for h in header) + "|"]
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
    gate, warning when max-flagged tolerates it, note for a new or missing layer without strict-layers."""
    rules = list(Rule)
    out = []
    for result in results:
        a = result.report.adapter
        uri, base = _sarif_uri(a.weights_file, root)
        artifact = {"uri": uri, **({"uriBaseId": base} if base else {})}
        for v in result.violations:
            verdict = _verdict_word(v, result)
            out.append({
                "ruleId": v.rule.value,
                "ruleIndex": rules.index(v.rule),
                "level": {"fails": "error", "tolerated": "warning", "reported": "note"}[verdict],
                "message": {"text": f"{v.module} ({a.path}): {v.message}"},
                "locations": [{
                    "physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}},
                    "logicalLocations": [{"name": v.module.rsplit(".", 1)[-1], "fullyQualifiedName": v.module,
                                          "kind": "module"}],
                }],
                "partialFingerprints": {"s3loraLayer/v1": f"{a.path}:{v.module}:{v.rule.value}"},
                "properties": {"adapter": a.path, "module": v.module, "value": _finite(v.value),
                               "limit": _finite(v.limit), "ssi": _finite(v.ssi),
                               "baseline_ssi": _finite(v.baseline_ssi), "verdict": verdict},
            })
    version = results[0].report.tool_version if results else ""
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [{
            "tool": {"driver": {"name": TOOL_NAME, "version": version, "rules": [_sarif_rule(r) for r in rules]}},
            "results": out,
            "properties": {"passed": all(r.passed for r in results)},
        }],
    }


def render_gate_table(result: GateResult) -> Group:
    """The verdict, the rules and the violating layers first, then the ranked table (those layers starred)."""
    style = "bold green" if result.passed else "bold red"
    parts: list[Any] = [Text(gate_summary_line(result), style=style)]
    rules = Table(box=None, pad_edge=False, show_edge=False)
    for h in ("rule", "limit", "allowed", "found", "result", "set by"):
        rules.add_column(h, justify="right" if h in ("limit", "allowed", "found") else "left", no_wrap=True)
    for o in result.rules:
        cells = (o.rule.value, _fmt_limit(o.limit), _allowed_text(o.allowed), str(o.violations),
                 "passed" if o.passed else "FAILED", o.source)
        rules.add_row(*map(Text, cells), style=None if o.passed else "red")
    parts.append(rules)
    if result.violations:
        table = Table(box=None, pad_edge=False, show_edge=False)
        for h in ("layer", "rule", "value", "limit", "verdict", "detail"):
            table.add_column(h, justify="right" if h in ("value", "limit") else "left", no_wrap=h != "detail")
        for v in result.violations:
            cells = (v.module, v.rule.value, _fmt_value(v), _fmt_limit(v.limit), _verdict_word(v, result), v.message)
            table.add_row(*map(Text, cells), style="red" if v.fails else None)  # Text: no markup in names
        parts += [Text(""), table]
    if result.baseline is not None:
        parts.append(Text(f"\ncompared with {result.baseline.adapter.path} by module name: "
                          f"{len(result.new_layers)} new layer(s), {len(result.missing_layers)} missing"))
    ranked = render_table(result.report, _violating(result))
    ranked.caption = "* = listed among the violations above"
    parts += [Text(""), ranked]
    return Group(*parts)


# --- adapter stores (s3lora scan, s3lora admit): JSON, JSON lines and the Rich tables -----------------------

from s3lora_cli import __version__  # noqa: E402
from s3lora_cli.store import AdmitResult, Neighbour, ScanResult, ScanRow, ScanSettings  # noqa: E402


def _neighbour_dict(n: Neighbour) -> dict[str, Any]:
    return {"path": n.path, "cosine": _finite(n.cosine), "shared_modules": n.shared_modules,
            "duplicate": n.duplicate}


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
    return {"method": o.method.value, "components": o.components, "top_h": o.top_h, "dtype": o.dtype,
            "max_ssi": None if policy is None else policy.max_ssi,
            "max_flagged": None if policy is None else policy.max_flagged,
            "max_increase": None if policy is None else policy.max_increase,
            "baseline": None if policy is None or policy.baseline is None else str(policy.baseline)}


def scan_summary(rows: tuple[ScanRow, ...] | list[ScanRow]) -> dict[str, int]:
    verdicts = [r.verdict for r in rows]
    return {"adapters": len(rows), "passed": verdicts.count("passed"), "failed": verdicts.count("failed"),
            "errors": verdicts.count("error"), "cached": sum(r.cached for r in rows),
            "with_duplicates": sum(any(n.duplicate for n in r.neighbours) for r in rows)}


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


def render_scan_table(result: ScanResult, similar: bool = False) -> Table:
    """The store's adapters ranked by risk: verdict, max SSI, layers over the threshold, the top layers."""
    threshold = None if result.settings.policy is None else result.settings.policy.max_ssi
    over = "over" if threshold is None else f"> {threshold:g}"
    table = Table(title=f"s3lora scan: {result.root}")
    headers = ["rank", "adapter", "verdict", "max ssi", over, "layers", "top layers"]
    headers += ["nearest (cosine)"] if similar else []
    headers += ["detail"]
    for h in headers:
        table.add_column(h, justify="right" if h in ("rank", "max ssi", over, "layers") else "left",
                         no_wrap=h in ("rank", "verdict", "max ssi", over, "layers"), overflow="fold")
    styles = {"failed": "bold red", "error": "yellow"}
    for i, row in enumerate(result.rows, start=1):
        top = ", ".join(f"{t.module} {_fmt(t.ssi, '.3f')}" for t in row.top_layers)
        detail = row.error or "; ".join(row.failing[:3]) + (" ..." if len(row.failing) > 3 else "")
        cells = [str(i), row.path, row.verdict, _fmt(row.max_ssi, ".4f"),
                 "-" if row.over_threshold is None else str(row.over_threshold), str(row.layers), top]
        cells += [_neighbours_text(row)] if similar else []
        cells += [detail]
        table.add_row(*map(Text, cells), style=styles.get(row.verdict))
    return table


def admit_dict(result: AdmitResult) -> dict[str, Any]:
    """``admit --format json``: the ``check --format json`` document plus an ``admit`` object."""
    return {
        **check_dict((result.gate,)),
        "admit": {"admitted": result.admitted, "name": result.name, "sha256": result.sha256,
                  "destination": str(result.destination), "already_present": result.already_present,
                  "audit_log": str(result.audit_log), "neighbours": [_neighbour_dict(n) for n in result.neighbours]},
    }


def admit_summary_line(result: AdmitResult) -> str:
    where = "already in" if result.already_present else "copied to"
    word = "admitted" if result.admitted else "REFUSED"
    dup = [n for n in result.neighbours if n.duplicate]
    extra = f"; near-duplicate of {', '.join(f'{n.path} ({n.cosine:.3f})' for n in dup)}" if dup else ""
    return f"{word} {result.gate.report.adapter.path}: {where} {result.destination}{extra}"


def render_admit_table(result: AdmitResult) -> Group:
    """The decision, the gate's verdict and table, and the nearest adapters of the store."""
    parts: list[Any] = [Text(admit_summary_line(result), style="bold green" if result.admitted else "bold red"),
                        render_gate_table(result.gate)]
    if result.neighbours:
        table = Table(title="nearest adapters in the store", box=None, pad_edge=False, show_edge=False)
        for h in ("adapter", "cosine", "shared modules", "duplicate"):
            table.add_column(h, justify="right" if h in ("cosine", "shared modules") else "left")
        for n in result.neighbours:
            table.add_row(Text(n.path), f"{n.cosine:.4f}", str(n.shared_modules), "yes" if n.duplicate else "",
                          style="red" if n.duplicate else None)
        parts += [Text(""), table]
    return Group(*parts)
