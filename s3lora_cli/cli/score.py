"""``s3lora score``: rank every LoRA layer of an adapter by SSI."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli import (
    ADAPTER_NAME,
    COMPONENTS,
    DEFAULT_TAU,
    DEMO_ADAPTER,
    DEVICE,
    DTYPE,
    EXHAUSTIVE,
    INPUT_FORMAT,
    QUIET,
    REVISION,
    TOP_H,
    Format,
    InputFormat,
    MethodName,
    app,
    check_apart,
    check_output,
    error_boundary,
    print_summary,
    progress_bar,
    table_width,
    write_output,
)
from s3lora_cli.errors import UsageError

ALLOW_LARGE = typer.Option(False, "--allow-large", help="Allow a --tau above the number of scored layers.")


@app.command()
@error_boundary
def score(
    adapter: Optional[str] = typer.Argument(None, metavar="ADAPTER", show_default=False,
        help="Adapter directory, one of its files, or a Hugging Face Hub id (org/name) in the local cache."),
    demo: bool = typer.Option(False, "--demo", help="Score the small demo adapter bundled with s3lora."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format: table, json, markdown or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    method: MethodName = typer.Option(MethodName.MAS_SVD, "--method", help="Spectral method: mas-svd (the paper), "
                                      "spsvd (no magnitude step) or svd (plain singular values), paper Table 5."),
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    exhaustive: bool = EXHAUSTIVE,
    tau: Optional[int] = typer.Option(None, "--tau", help="Mark the top-tau layers by SSI, what prune --tau would "
                                      f"remove (default: {DEFAULT_TAU}, or every layer of a smaller adapter)."),
    allow_large: bool = ALLOW_LARGE,
    top: Optional[int] = typer.Option(None, "--top", help="List only the N highest-SSI layers in the table or "
                                      "Markdown (default: every layer; JSON and CSV always hold every layer)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
    revision: Optional[str] = REVISION,
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Layers scored at once, each with its share of "
                                       "the cores (default: 1 below 8 cores, then one per 4 cores, at most 4)."),
) -> None:
    """Rank every LoRA layer of an adapter by its Spectral Sharpness Index (highest first): the share of the
    layer's update in its strongest direction, which S3LoRA treats as a safety risk when concentrated."""
    from s3lora_cli import cores, report
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.policy import marked_tau, top_tau
    from s3lora_cli.scoring import ScoreOptions, score_adapter

    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    path = resolve_adapter_path(_adapter_path(adapter, demo), revision)
    check_output(output, force)
    check_apart({"--output": output}, [path])
    options = ScoreOptions(method=method.method(), components=components, top_h=top_h, exhaustive=exhaustive,
                           device=device, dtype=dtype, input_format=input_format.value, adapter_name=adapter_name)
    with progress_bar(quiet) as progress:
        result = score_adapter(path, options, progress=progress, jobs=jobs or cores.default_jobs())
    tau = marked_tau(result, tau, allow_large)
    marked = {s.module for s in top_tau(result, tau)}
    if fmt is Format.json:
        write_output(report.render_json(report.report_dict(result, marked, tau)), output, force)
    elif fmt is Format.markdown:
        write_output(report.render_markdown(result, marked, tau, top=top), output, force)
    elif fmt is Format.csv:
        write_output(report.render_csv(result, marked), output, force)
    else:
        width = table_width() if output is None else None
        write_output(report.render_table(result, marked, tau=tau, width=width, top=top), output, force)
    if not quiet:
        print_summary(report.score_summary(result, marked, tau))
        print_summary(f"warning: {s.module}: {s.error}" for s in result.layers if s.error)


def _adapter_path(adapter: Optional[str], demo: bool) -> str:
    if demo and adapter is not None:
        raise UsageError("give an adapter path or --demo, not both")
    if demo:
        return str(DEMO_ADAPTER)
    if adapter is None:
        raise UsageError("missing the adapter path (or pass --demo to score the bundled demo adapter)")
    return adapter
