"""``s3lora score``: rank every LoRA layer of an adapter by SSI."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from s3lora_cli import report
from s3lora_cli.cli import (
    ADAPTER_NAME,
    COMPONENTS,
    DEMO_ADAPTER,
    DEVICE,
    DTYPE,
    EXHAUSTIVE,
    INPUT_FORMAT,
    QUIET,
    TOP_H,
    Format,
    InputFormat,
    app,
    check_apart,
    check_output,
    error_boundary,
    progress_bar,
    stderr_console,
    write_output,
)
from s3lora_cli.errors import UsageError
from s3lora_cli.policy import DEFAULT_TAU, top_tau
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.spectral import Method


@app.command()
@error_boundary
def score(
    adapter: Optional[Path] = typer.Argument(None, 
        help="Adapter directory or weights file (PEFT, kohya, diffusers, MLX-LM)."),
    demo: bool = typer.Option(False, "--demo", help="Score the small demo adapter bundled with s3lora."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    method: Method = typer.Option(Method.MAS_SVD, "--method", help="Spectral method (paper Table 5)."),
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    exhaustive: bool = EXHAUSTIVE,
    tau: int = typer.Option(DEFAULT_TAU, "--tau", help="Mark the top-tau layers by SSI (what prune would remove)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
) -> None:
    """Rank every LoRA layer of an adapter by its Spectral Sharpness Index (highest first)."""
    path = _adapter_path(adapter, demo)
    check_output(output, force)
    check_apart({"--output": output}, [path])
    options = ScoreOptions(method=method, components=components, top_h=top_h, exhaustive=exhaustive,
                           device=device, dtype=dtype, input_format=input_format.value, adapter_name=adapter_name)
    with progress_bar(quiet) as progress:
        result = score_adapter(path, options, progress=progress)
    flagged = {s.module for s in top_tau(result, tau)}
    if fmt is Format.json:
        write_output(report.render_json(report.report_dict(result, flagged, tau)), output, force)
    elif fmt is Format.markdown:
        write_output(report.render_markdown(result, flagged, tau), output, force)
    elif fmt is Format.csv:
        write_output(report.render_csv(result, flagged), output, force)
    elif output is None:  # a pipe gets full lines rather than a table folded to 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(report.render_table(result, flagged, tau))
    else:
        recorder = Console(record=True, width=160, file=io.StringIO())
        recorder.print(report.render_table(result, flagged, tau))
        write_output(recorder.export_text(), output, force)
    if not quiet:
        stderr_console().print(report.summary_line(result, flagged, tau), soft_wrap=True)
        for s in result.layers:
            if s.error:
                stderr_console().print(f"warning: {s.module}: {s.error}", soft_wrap=True)


def _adapter_path(adapter: Optional[Path], demo: bool) -> Path:
    if demo and adapter is not None:
        raise UsageError("give an adapter path or --demo, not both")
    if demo:
        return DEMO_ADAPTER
    if adapter is None:
        raise UsageError("missing the adapter path (or pass --demo to score the bundled demo adapter)")
    return adapter
