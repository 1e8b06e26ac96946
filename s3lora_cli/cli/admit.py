"""``s3lora admit``: gate one adapter into a store (or its quarantine), logged; exits as ``check`` does."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli import (
    BASELINE,
    COMPONENTS,
    DEVICE,
    EXIT_GATE_FAILED,
    GATE_METHOD,
    MAX_INCREASE,
    MAX_SSI,
    MAX_VIOLATIONS,
    POLICY,
    STRICT_LAYERS,
    TOP_H,
    VERBOSE,
    MethodName,
    app,
    check_apart,
    check_output,
    error_boundary,
    gate_flags,
    print_summary,
    table_width,
    write_output,
)
from s3lora_cli.cli.scan import DUPLICATE_THRESHOLD, NEIGHBOURS


class AdmitFormat(str, enum.Enum):
    table = "table"
    json = "json"


@app.command()
@error_boundary
def admit(
    adapter: Path = typer.Argument(..., metavar="ADAPTER", help="The adapter directory (or weights file) to admit."),
    store: Path = typer.Option(..., "--store", help="The store directory (created if missing)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in the store (default: the adapter's directory "
                                       "name); the entry is <name>-<first 12 hex digits of its content key "
                                       "(weights and config)>."),
    quarantine: Optional[Path] = typer.Option(None, "--quarantine", help="Where refused adapters go "
                                              "(default <store>.quarantine beside the store)."),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="JSON-lines log of every decision "
                                             "(default <store>/.s3lora-audit.jsonl)."),
    neighbours: int = NEIGHBOURS,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    max_ssi: Optional[float] = MAX_SSI,
    max_violations: Optional[int] = MAX_VIOLATIONS,
    baseline: Optional[Path] = BASELINE,
    max_increase: Optional[float] = MAX_INCREASE,
    strict_layers: Optional[bool] = STRICT_LAYERS,
    policy: Optional[Path] = POLICY,
    method: Optional[MethodName] = GATE_METHOD,
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    device: str = DEVICE,
    fmt: AdmitFormat = typer.Option(AdmitFormat.table, "--format", "-f", help="table or json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No decision line on stderr."),
    verbose: bool = VERBOSE,
) -> None:
    """Run the gate on ADAPTER: copy it into --store when it passes (exit 0), into the quarantine with its report
    when it fails (exit 1); every decision is appended to the audit log. Exit codes as for check: 2 usage,
    3 input, 4 runtime."""
    from s3lora_cli import report
    from s3lora_cli.gate import resolve_policy
    from s3lora_cli.store import admit_adapter

    gate_policy = resolve_policy(gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers,
                                            method and method.value, components, top_h), policy)
    check_output(output, force)
    check_apart({"--output": output}, [adapter])
    result = admit_adapter(adapter, store, gate_policy, device=device, name=name, quarantine=quarantine,
                           audit_log=audit_log, neighbours=neighbours, duplicate_threshold=duplicate_threshold,
                           report_json=lambda gate: report.render_json(report.check_dict((gate,))))
    if fmt is AdmitFormat.json:
        write_output(report.render_json(report.admit_dict(result)), output, force)
    else:
        width = table_width() if output is None else None
        write_output(report.render_admit_text(result, width, verbose), output, force)
    if not quiet:
        print_summary([f"warning: {warning}" for warning in result.warnings])
    if not quiet and (fmt is not AdmitFormat.table or output is not None):
        print_summary([report.admit_summary_line(result)])
    if not result.admitted:
        raise typer.Exit(EXIT_GATE_FAILED)
