"""``s3lora admit``: gate one adapter into a store (or its quarantine), logged; exits as ``check`` does."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import ExitCode, error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_NEIGHBOURS,
    FORMAT,
    AuditLog,
    Baseline,
    Components,
    Device,
    DuplicateThreshold,
    Force,
    MaxIncrease,
    MaxSsi,
    MaxViolations,
    MethodOption,
    Neighbours,
    Output,
    PolicyFile,
    Quarantine,
    Quiet,
    StoreOption,
    StrictLayers,
    TopH,
    Verbose,
    gate_flags,
)
from s3lora_cli.cli.output import Target, check_apart, print_summary


class AdmitFormat(str, enum.Enum):
    table = "table"
    json = "json"


AdapterPath = Annotated[
    Path, typer.Argument(metavar="ADAPTER", help="The adapter directory (or weights file) to admit.")
]
Name = Annotated[
    Optional[str],
    typer.Option(
        "--name",
        help="Name in the store (default: the adapter's directory name); the entry is <name>-<first 12 hex digits "
        "of its content key (weights and config)>.",
    ),
]


@app.command()
@error_boundary
def admit(
    adapter: AdapterPath,
    store: StoreOption,
    name: Name = None,
    quarantine: Quarantine = None,
    audit_log: AuditLog = None,
    neighbours: Neighbours = DEFAULT_NEIGHBOURS,
    duplicate_threshold: DuplicateThreshold = DEFAULT_DUPLICATE_THRESHOLD,
    max_ssi: MaxSsi = None,
    max_violations: MaxViolations = None,
    baseline: Baseline = None,
    max_increase: MaxIncrease = None,
    strict_layers: StrictLayers = None,
    policy: PolicyFile = None,
    method: MethodOption = None,
    components: Components = None,
    top_h: TopH = None,
    device: Device = "auto",
    fmt: Annotated[AdmitFormat, FORMAT] = AdmitFormat.table,
    output: Output = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run the gate on ADAPTER: copy it into --store when it passes (exit 0), into the quarantine with its report
    when it fails (exit 1); every decision is appended to the audit log. Exit codes as for check: 2 usage,
    3 input, 4 runtime."""
    from s3lora_cli import report
    from s3lora_cli.gate import resolve_policy
    from s3lora_cli.store import admit_adapter

    flags = gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers, method, components, top_h)
    gate_policy = resolve_policy(flags, policy)
    target = Target(output, force)
    target.check()
    check_apart({"--output": output}, [adapter])
    result = admit_adapter(
        adapter,
        store,
        gate_policy,
        device=device,
        name=name,
        quarantine=quarantine,
        audit_log=audit_log,
        neighbours=neighbours,
        duplicate_threshold=duplicate_threshold,
        report_json=lambda gate: report.render_json(report.check_dict((gate,))),
    )
    target.render(
        fmt,
        {
            AdmitFormat.json: lambda: report.render_json(report.admit_dict(result)),
            AdmitFormat.table: lambda: report.render_admit_text(result, target.width(), verbose),
        },
    )
    if not quiet:
        print_summary([f"warning: {warning}" for warning in result.warnings])
    if not quiet and (fmt is not AdmitFormat.table or output is not None):
        print_summary([report.admit_summary_line(result)])
    if not result.admitted:
        raise typer.Exit(ExitCode.GATE_FAILED)
