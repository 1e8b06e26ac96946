"""``s3lora check``: the CI gate; exits 1 when an adapter has layers sharper than the policy allows."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli import (
    ADAPTER_NAME,
    BASELINE,
    COMPONENTS,
    DEVICE,
    EXIT_GATE_FAILED,
    GATE_METHOD,
    INPUT_FORMAT,
    MAX_INCREASE,
    MAX_SSI,
    MAX_VIOLATIONS,
    POLICY,
    REVISION,
    STRICT_LAYERS,
    TOP_H,
    VERBOSE,
    InputFormat,
    MethodName,
    app,
    check_apart,
    check_output,
    error_boundary,
    gate_flags,
    print_summary,
    progress_bar,
    table_width,
    write_output,
)


class CheckFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    sarif = "sarif"


@app.command()
@error_boundary
def check(
    adapters: list[str] = typer.Argument(..., metavar="ADAPTER", show_default=False, help="Adapter "
                                         "directories, files of adapters, or Hugging Face Hub ids in the local cache."),
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
    fmt: CheckFormat = typer.Option(CheckFormat.table, "--format", "-f", help="Output format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    markdown_output: Optional[Path] = typer.Option(
        None, "--markdown-output", help="Also write the Markdown report to this file."),
    sarif_output: Optional[Path] = typer.Option(None, "--sarif-output", help="Also write the SARIF log to this file."),
    force: bool = typer.Option(False, "--force", help="Overwrite output files that exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or verdict on stderr."),
    verbose: bool = VERBOSE,
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
    revision: Optional[str] = REVISION,
) -> None:
    """Fail (exit 1) when an adapter breaks the gate: a layer above --max-ssi, a rise above --max-increase
    over --baseline, or a layer with NaN/Inf values. Exit codes: 0 passed, 1 failed, 2 usage, 3 input, 4 runtime."""
    from dataclasses import replace

    from s3lora_cli import report
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.gate import check_adapters, resolve_policy

    flags = gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers,
                       method and method.value, components, top_h)
    gate_policy = resolve_policy(flags, policy)
    if gate_policy.baseline is not None:
        gate_policy = replace(gate_policy, baseline=resolve_adapter_path(gate_policy.baseline, revision))
    for path in (output, markdown_output, sarif_output):
        check_output(path, force)
    paths = [resolve_adapter_path(a, revision) for a in adapters]
    check_apart({"--output": output, "--markdown-output": markdown_output, "--sarif-output": sarif_output},
                [*paths, *([gate_policy.baseline] if gate_policy.baseline is not None else [])])
    with progress_bar(quiet) as progress:
        results = check_adapters(paths, gate_policy, device, progress, input_format=input_format.value,
                                 adapter_name=adapter_name)
    renderers = {
        CheckFormat.json: lambda: report.render_json(report.check_dict(results)),
        CheckFormat.markdown: lambda: report.render_gate_markdown(results),
        CheckFormat.sarif: lambda: report.render_json(report.sarif_dict(results, Path.cwd())),
        CheckFormat.table: lambda: _table_text(results, table_width() if output is None else None, verbose),
    }
    for path, kind in ((markdown_output, CheckFormat.markdown), (sarif_output, CheckFormat.sarif)):
        if path is not None:
            write_output(renderers[kind](), path, force)
    write_output(renderers[fmt](), output, force)
    if not quiet and (fmt is not CheckFormat.table or output is not None):  # else the verdict is on stdout
        print_summary(report.gate_summary_line(result) for result in results)
    if not all(result.passed for result in results):
        raise typer.Exit(EXIT_GATE_FAILED)


def _table_text(results, width: int | None, verbose: bool) -> str:
    from s3lora_cli import report

    return "\n".join(report.render_gate_text(result, width, verbose) for result in results)
