"""``s3lora check``: the CI gate; exits 1 when an adapter has layers sharper than the policy allows."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import ExitCode, error_boundary
from s3lora_cli.cli.options import (
    FORMAT,
    AdapterName,
    Baseline,
    Components,
    Device,
    Force,
    InputFormat,
    InputFormatOption,
    MaxIncrease,
    MaxSsi,
    MaxViolations,
    MethodOption,
    Output,
    PolicyFile,
    Quiet,
    Revision,
    StrictLayers,
    TopH,
    Verbose,
    gate_flags,
)
from s3lora_cli.cli.output import Target, check_apart, print_summary, progress_bar


class CheckFormat(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    sarif = "sarif"


Adapters = Annotated[
    list[str],
    typer.Argument(
        metavar="ADAPTER",
        show_default=False,
        help="Adapter directories, files of adapters, or Hugging Face Hub ids in the local cache.",
    ),
]
MarkdownOutput = Annotated[
    Optional[Path], typer.Option("--markdown-output", help="Also write the Markdown report to this file.")
]
SarifOutput = Annotated[Optional[Path], typer.Option("--sarif-output", help="Also write the SARIF log to this file.")]


@app.command()
@error_boundary
def check(
    adapters: Adapters,
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
    fmt: Annotated[CheckFormat, FORMAT] = CheckFormat.table,
    output: Output = None,
    markdown_output: MarkdownOutput = None,
    sarif_output: SarifOutput = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    input_format: InputFormatOption = InputFormat.auto,
    adapter_name: AdapterName = None,
    revision: Revision = None,
) -> None:
    """Fail (exit 1) when an adapter breaks the gate: a layer above --max-ssi, a rise above --max-increase
    over --baseline, or a layer with NaN/Inf values. Exit codes: 0 passed, 1 failed, 2 usage, 3 input, 4 runtime."""
    from s3lora_cli import report
    from s3lora_cli.gate import check_adapters

    flags = gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers, method, components, top_h)
    targets = {CheckFormat.markdown: Target(markdown_output, force), CheckFormat.sarif: Target(sarif_output, force)}
    gate_policy, paths = _resolve(flags, policy, adapters, revision, [Target(output, force), *targets.values()])
    with progress_bar(quiet) as progress:
        results = check_adapters(
            paths, gate_policy, device, progress, input_format=input_format.value, adapter_name=adapter_name
        )
    renderers = _renderers(results, Target(output, force).width(), verbose)
    for kind, target in targets.items():
        if target.path is not None:
            target.render(kind, renderers)
    Target(output, force).render(fmt, renderers)
    if not quiet and (fmt is not CheckFormat.table or output is not None):  # else the verdict is on stdout
        print_summary(report.gate_summary_line(result) for result in results)
    if not all(result.passed for result in results):
        raise typer.Exit(ExitCode.GATE_FAILED)


def _resolve(
    flags: dict[str, Any],
    policy: Optional[Path],
    adapters: Sequence[str],
    revision: Optional[str],
    targets: Sequence[Target],
) -> tuple[Any, list[Path]]:
    """The gate's policy and the adapters' paths; the outputs refused, before any work, if they exist (without
    --force), coincide, or lie inside an input."""
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.gate import resolve_policy

    gate_policy = resolve_policy(flags, policy)
    if gate_policy.baseline is not None:
        gate_policy = replace(gate_policy, baseline=resolve_adapter_path(gate_policy.baseline, revision))
    for target in targets:
        target.check()
    paths = [resolve_adapter_path(a, revision) for a in adapters]
    baseline = [gate_policy.baseline] if gate_policy.baseline is not None else []
    options = ("--output", "--markdown-output", "--sarif-output")
    check_apart({option: target.path for option, target in zip(options, targets, strict=True)}, [*paths, *baseline])
    return gate_policy, paths


def _renderers(results: Any, width: int | None, verbose: bool) -> dict[CheckFormat, Callable[[], str]]:
    from s3lora_cli import report

    return {
        CheckFormat.json: lambda: report.render_json(report.check_dict(results)),
        CheckFormat.markdown: lambda: report.render_gate_markdown(results),
        CheckFormat.sarif: lambda: report.render_json(report.sarif_dict(results, Path.cwd())),
        CheckFormat.table: lambda: "\n".join(report.render_gate_text(r, width, verbose) for r in results),
    }
