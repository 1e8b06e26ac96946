"""The final report of ``s3lora adapt run`` as a plain-text table: a pure function of its JSON document."""

from __future__ import annotations

from typing import Any


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def loop_table(doc: dict[str, Any]) -> str:
    """The counters, the seconds per stage and one line per adapter of a ``LoopReport.to_json()`` document."""
    stages = doc["stage_seconds"]
    rows = [
        ("samples seen", str(doc["samples"])),
        ("triggered", str(doc["triggered"])),
        ("routed to an adapter", str(doc["routed"])),
        ("clusters", str(doc["clusters"])),
        ("adapters trained", str(doc["adapters_trained"])),
        ("pruned layers", str(doc["pruned_layers"])),
        ("admitted", str(doc["admitted"])),
        ("quarantined", str(doc["quarantined"])),
        ("seconds", f"{doc['seconds']:.1f} (this invocation)"),
    ]
    rows += [(f"  {stage}", f"{seconds:.1f} s") for stage, seconds in stages.items()]
    lines = _rows(rows)
    if doc["adapters"]:
        lines.append("")
        lines.append(
            f"{'cluster':>7}  {'gen':>3}  {'samples':>7}  {'verdict':<8}  {'val EM':>6}  "
            f"{'pruned':>6}  {'pruned':>8}  entry"
        )
        lines.append(f"{'':>7}  {'':>3}  {'':>7}  {'':<8}  {'':>6}  {'val EM':>6}  {'layers':>8}")
        for a in doc["adapters"]:
            layers = f"{a['pruned_layers']}/{a['scored_layers']}"
            lines.append(
                f"{a['cluster']:>7}  {a.get('generation', 1):>3}  {a['members']:>7}  {a['verdict']:<8}  "
                f"{a['validation_before']:>6.3f}  {a['validation_after']:>6.3f}  {layers:>8}  {a['entry']}"
            )
            for reason in a["reasons"][:1]:
                lines.append(f"{'':>7}  reason: {reason}")
    return "\n".join(lines) + "\n"
