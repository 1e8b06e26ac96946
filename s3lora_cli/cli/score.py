"""``s3lora score``: rank every LoRA layer of an adapter by SSI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from s3lora_cli.cli.app import DEMO_ADAPTER, app
from s3lora_cli.cli.boundary import error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_TAU,
    FORMAT,
    AdapterName,
    Components,
    Device,
    Dtype,
    Exhaustive,
    Force,
    Format,
    InputFormat,
    InputFormatOption,
    Jobs,
    MethodOption,
    Output,
    Quiet,
    Revision,
    TopH,
    score_options,
)
from s3lora_cli.cli.output import Target, check_apart, print_summary, progress_bar
from s3lora_cli.errors import UsageError

Tau = Annotated[
    Optional[int],
    typer.Option(
        "--tau",
        help=f"Mark the top-tau layers by SSI, what prune --tau would remove (default: {DEFAULT_TAU}, or every "
        "layer of a smaller adapter).",
    ),
]
AllowLarge = Annotated[bool, typer.Option("--allow-large", help="Allow a --tau above the number of scored layers.")]
Top = Annotated[
    Optional[int],
    typer.Option(
        "--top",
        help="List only the N highest-SSI layers in the table or Markdown (default: every layer; JSON and CSV "
        "always hold every layer).",
    ),
]


@app.command()
@error_boundary
def score(
    adapter: Annotated[
        Optional[str],
        typer.Argument(
            metavar="ADAPTER",
            show_default=False,
            help="Adapter directory, one of its files, or a Hugging Face Hub id (org/name) in the local cache.",
        ),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Score the small demo adapter bundled with s3lora.")] = False,
    fmt: Annotated[Format, FORMAT] = Format.table,
    output: Output = None,
    force: Force = False,
    method: MethodOption = None,
    components: Components = None,
    top_h: TopH = None,
    exhaustive: Exhaustive = False,
    tau: Tau = None,
    allow_large: AllowLarge = False,
    top: Top = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    quiet: Quiet = False,
    input_format: InputFormatOption = InputFormat.auto,
    adapter_name: AdapterName = None,
    revision: Revision = None,
    jobs: Jobs = None,
) -> None:
    """Rank every LoRA layer of an adapter by its Spectral Sharpness Index (highest first): the share of the
    layer's update in its strongest direction, which S3LoRA treats as a safety risk when concentrated."""
    from s3lora_cli import cores, report
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.scoring import score_adapter
    from s3lora_cli.selection import marked_tau, top_tau

    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    target = Target(output, force)
    path = resolve_adapter_path(_adapter_path(adapter, demo), revision)
    target.check()
    check_apart({"--output": output}, [path])
    options = score_options(method, components, top_h, exhaustive, device, dtype, input_format, adapter_name)
    with progress_bar(quiet) as progress:
        result = score_adapter(path, options, progress=progress, jobs=jobs or cores.default_jobs())
    tau = marked_tau(result, tau, allow_large)
    marked = {s.module for s in top_tau(result, tau)}
    target.render(fmt, _renderers(result, marked, tau, top, target.width()))
    if not quiet:
        print_summary(report.score_summary(result, marked, tau))
        print_summary(f"warning: {s.module}: {s.error}" for s in result.layers if s.error)


def _renderers(
    result: Any, marked: set[str], tau: int, top: int | None, width: int | None
) -> dict[Format, Callable[[], str]]:
    from s3lora_cli import report

    return {
        Format.json: lambda: report.render_json(report.report_dict(result, marked, tau)),
        Format.markdown: lambda: report.render_markdown(result, marked, tau, top=top),
        Format.csv: lambda: report.render_csv(result, marked),
        Format.table: lambda: report.render_table(result, marked, tau=tau, width=width, top=top),
    }


def _adapter_path(adapter: Optional[str], demo: bool) -> str:
    if demo and adapter is not None:
        raise UsageError("give an adapter path or --demo, not both")
    if demo:
        return str(DEMO_ADAPTER)
    if adapter is None:
        raise UsageError("missing the adapter path (or pass --demo to score the bundled demo adapter)")
    return adapter
