"""``s3lora admit``: gate one adapter into a store (or its quarantine), logged; exits as ``check`` does."""

from __future__ import annotations

import enum
import io
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from s3lora_cli import report
from s3lora_cli.cli import (
    BASELINE,
    COMPONENTS,
    DEVICE,
    EXIT_GATE_FAILED,
    GATE_METHOD,
    MAX_FLAGGED,
    MAX_INCREASE,
    MAX_SSI,
    POLICY,
    STRICT_LAYERS,
    TOP_H,
    app,
    check_apart,
    check_output,
    error_boundary,
    gate_flags,
    stderr_console,
    write_output,
)
from s3lora_cli.cli.scan import DUPLICATE_THRESHOLD, NEIGHBOURS
from s3lora_cli.gate import resolve_policy
from s3lora_cli.spectral import Method
from s3lora_cli.store import admit_adapter


class AdmitFormat(str, enum.Enum):
    table = "table"
    json = "json"


@app.command()
@error_boundary
def admit(
    adapter: Path = typer.Argument(..., help="The adapter directory (or weights file) to admit."),
    store: Path = typer.Option(..., "--store", help="The store directory (created if missing)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in the store (default: the adapter's directory "
                                       "name); the entry is <name>-<first 12 hex digits of the weights' sha256>."),
    quarantine: Optional[Path] = typer.Option(None, "--quarantine", help="Where refused adapters go "
                                              "(default <store>.quarantine beside the store)."),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="JSON-lines log of every decision "
                                             "(default <store>/.s3lora-audit.jsonl)."),
    neighbours: int = NEIGHBOURS,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    max_ssi: Optional[float] = MAX_SSI,
    max_flagged: Optional[int] = MAX_FLAGGED,
    baseline: Optional[Path] = BASELINE,
    max_increase: Optional[float] = MAX_INCREASE,
    strict_layers: Optional[bool] = STRICT_LAYERS,
    policy: Optional[Path] = POLICY,
    method: Optional[Method] = GATE_METHOD,
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    device: str = DEVICE,
    fmt: AdmitFormat = typer.Option(AdmitFormat.table, "--format", "-f", help="table or json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No decision line on stderr."),
) -> None:
    """Run the gate on ADAPTER: copy it into --store when it passes (exit 0), into the quarantine with its report
    when it fails (exit 1); every decision is appended to the audit log. Exit codes as for check: 2 usage,
    3 input, 4 runtime."""
    gate_policy = resolve_policy(gate_flags(max_ssi, max_flagged, baseline, max_increase, strict_layers, method,
                                            components, top_h), policy)
    check_output(output, force)
    check_apart({"--output": output}, [adapter])
    result = admit_adapter(adapter, store, gate_policy, device=device, name=name, quarantine=quarantine,
                           audit_log=audit_log, neighbours=neighbours, duplicate_threshold=duplicate_threshold,
                           report_json=lambda gate: report.render_json(report.check_dict((gate,))))
    if fmt is AdmitFormat.json:
        write_output(report.render_json(report.admit_dict(result)), output, force)
    elif output is None:
        Console(width=None if sys.stdout.isatty() else 200).print(report.render_admit_table(result))
    else:
        recorder = Console(record=True, width=160, file=io.StringIO())
        recorder.print(report.render_admit_table(result))
        write_output(recorder.export_text(), output, force)
    if not quiet:
        for warning in result.warnings:
            stderr_console().print(f"warning: {warning}", soft_wrap=True, markup=False)
    if not quiet and (fmt is not AdmitFormat.table or output is not None):
        stderr_console().print(report.admit_summary_line(result), soft_wrap=True, markup=False)
    if not result.admitted:
        raise typer.Exit(EXIT_GATE_FAILED)
