"""``s3lora check``: the CI gate; exits 1 when an adapter has layers sharper than the policy allows."""

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
    ADAPTER_NAME,
    BASELINE,
    COMPONENTS,
    DEVICE,
    EXIT_GATE_FAILED,
    GATE_METHOD,
    INPUT_FORMAT,
    MAX_FLAGGED,
    MAX_INCREASE,
    MAX_SSI,
    POLICY,
    STRICT_LAYERS,
    TOP_H,
    InputFormat,
    app,
    check_apart,
    check_output,
    error_boundary,
    gate_flags,
    progress_bar,
    stderr_console,
    write_output,
)
from s3lora_cli.gate import check_adapters, resolve_policy
from s3lora_cli.spectral import Method


class CheckFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    sarif = "sarif"


@app.command()
@error_boundary
def check(
    adapters: list[Path] = typer.Argument(..., help="Adapter directories (or weights files)."),
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
    fmt: CheckFormat = typer.Option(CheckFormat.table, "--format", "-f", help="Output format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    markdown_output: Optional[Path] = typer.Option(
        None, "--markdown-output", help="Also write the Markdown report to this file."),
    sarif_output: Optional[Path] = typer.Option(None, "--sarif-output", help="Also write the SARIF log to this file."),
    force: bool = typer.Option(False, "--force", help="Overwrite output files that exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or verdict on stderr."),
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
) -> None:
    """Fail (exit 1) when an adapter breaks the gate: a layer above --max-ssi, a rise above --max-increase
    over --baseline, or a layer with NaN/Inf values. Exit codes: 0 passed, 1 failed, 2 usage, 3 input, 4 runtime."""
    flags = gate_flags(max_ssi, max_flagged, baseline, max_increase, strict_layers, method, components, top_h)
    gate_policy = resolve_policy(flags, policy)
    for path in (output, markdown_output, sarif_output):
        check_output(path, force)
    check_apart({"--output": output, "--markdown-output": markdown_output, "--sarif-output": sarif_output},
                [*adapters, *([gate_policy.baseline] if gate_policy.baseline is not None else [])])
    with progress_bar(quiet) as progress:
        results = check_adapters(adapters, gate_policy, device, progress, input_format=input_format.value,
                                 adapter_name=adapter_name)
    renderers = {
        CheckFormat.json: lambda: report.render_json(report.check_dict(results)),
        CheckFormat.markdown: lambda: report.render_gate_markdown(results),
        CheckFormat.sarif: lambda: report.render_json(report.sarif_dict(results, Path.cwd())),
        CheckFormat.table: lambda: _table_text(results, 160),
    }
    for path, kind in ((markdown_output, CheckFormat.markdown), (sarif_output, CheckFormat.sarif)):
        if path is not None:
            write_output(renderers[kind](), path, force)
    if fmt is CheckFormat.table and output is None:  # a pipe gets full lines rather than a table folded to 80 columns
        console = Console(width=None if sys.stdout.isatty() else 200)
        for result in results:
            console.print(report.render_gate_table(result))
    else:
        write_output(renderers[fmt](), output, force)
    if not quiet and (fmt is not CheckFormat.table or output is not None):  # else the verdict is on stdout
        for result in results:
            stderr_console().print(report.gate_summary_line(result), soft_wrap=True, markup=False)
    if not all(result.passed for result in results):
        raise typer.Exit(EXIT_GATE_FAILED)


def _table_text(results, width: int) -> str:
    recorder = Console(record=True, width=width, file=io.StringIO())
    for result in results:
        recorder.print(report.render_gate_table(result))
    return recorder.export_text()
