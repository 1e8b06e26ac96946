"""``s3lora prune``: write a copy of an adapter with the LoRA updates of its highest-SSI layers removed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from s3lora_cli import report
from s3lora_cli.cli import (
    ADAPTER_NAME,
    COMPONENTS,
    DEVICE,
    DTYPE,
    EXHAUSTIVE,
    INPUT_FORMAT,
    QUIET,
    TOP_H,
    Format,
    InputFormat,
    app,
    error_boundary,
    progress_bar,
    stderr_console,
    write_output,
)
from s3lora_cli.policy import DEFAULT_TAU, Selection
from s3lora_cli.pruning import PruneMode, PruneResult, prune_adapter, prune_document
from s3lora_cli.scoring import ScoreOptions
from s3lora_cli.spectral import Method


@app.command()
@error_boundary
def prune(
    adapter: Path = typer.Argument(..., 
        help="Adapter directory or weights file (PEFT, kohya, diffusers, MLX-LM)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write the pruned adapter, in the input's format: a directory (default: "
        "<adapter>-pruned beside the input), or for a single-file adapter the file (default: "
        "<name>-pruned.safetensors)."),
    tau: Optional[int] = typer.Option(None, "--tau", help=f"Prune the tau highest-SSI layers (paper Eq. 5) "
                                      f"(default: {DEFAULT_TAU}, unless --threshold or --fraction)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Prune every layer with SSI >= this (0-1)."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Prune the top fraction of layers by SSI "
                                             "(0-1], rounded up: 0.1 of 25 layers prunes 3."),
    mode: PruneMode = typer.Option(PruneMode.ZERO, "--mode", help="zero: set lora_B to zeros (the paper's "
                                   "operation); drop: remove the layers' tensors and exclude their modules."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be pruned; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace the output adapter directory if it exists."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format (to stdout)."),
    method: Method = typer.Option(Method.MAS_SVD, "--method", help="Spectral method (paper Table 5)."),
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    exhaustive: bool = EXHAUSTIVE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
) -> None:
    """Zero (or drop) the LoRA update of the highest-SSI layers; the frozen base weights are untouched."""
    selection = Selection.of(tau, threshold, fraction)
    options = ScoreOptions(method=method, components=components, top_h=top_h, exhaustive=exhaustive,
                           device=device, dtype=dtype, input_format=input_format.value, adapter_name=adapter_name)
    with progress_bar(quiet) as progress:
        result = prune_adapter(adapter, output, selection, mode, options, force=force, dry_run=dry_run,
                               progress=progress)
    flagged = set(result.modules)
    if fmt is Format.json:
        write_output(report.render_json(prune_document(result)), None, False)
    elif fmt is Format.markdown:
        write_output(report.render_markdown(result.report, flagged, selection.tau), None, False)
    elif fmt is Format.csv:
        write_output(report.render_csv(result.report, flagged), None, False)
    else:
        table = report.render_table(result.report, flagged)
        table.caption = f"* = pruned ({selection.describe()}, --mode {mode.value}) -> {result.output}"
        Console(width=None if sys.stdout.isatty() else 200).print(table)
    if not quiet:
        _summary(result)


def _summary(result: PruneResult) -> None:
    err = stderr_console()
    err.print(report.summary_line(result.report, set(result.modules), result.selection.tau), soft_wrap=True)
    for p in result.pruned:
        if p.note:
            err.print(f"note: {p.module}: {p.note}", soft_wrap=True)
    counts = ", ".join(f"{sum(p.action is m for p in result.pruned)} {m.value}" for m in PruneMode)
    verb = "pruned" if result.written else "dry run: would prune"
    where = f"wrote {result.output}" if result.written else f"would write {result.output}; nothing was written"
    err.print(f"{verb} {len(result.pruned)} layer(s) ({result.selection.describe()}: {counts}); {where}",
              soft_wrap=True)
