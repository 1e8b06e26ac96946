"""``s3lora prune``: write a copy of an adapter with the LoRA updates of its highest-SSI layers removed."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli import (
    ADAPTER_NAME,
    COMPONENTS,
    DEFAULT_TAU,
    DEVICE,
    DTYPE,
    EXHAUSTIVE,
    INPUT_FORMAT,
    QUIET,
    REVISION,
    TOP_H,
    VERBOSE,
    Format,
    InputFormat,
    MethodName,
    app,
    error_boundary,
    print_summary,
    progress_bar,
    table_width,
    write_output,
)


class ModeName(str, enum.Enum):
    """The --mode choices: the values of ``pruning.PruneMode`` (a test keeps them equal)."""

    ZERO = "zero"
    DROP = "drop"


@app.command()
@error_boundary
def prune(
    adapter: str = typer.Argument(..., metavar="ADAPTER", show_default=False,
        help="Adapter directory, one of its files, or a Hugging Face Hub id (org/name) in the local cache."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where to write the pruned adapter, in the input's format: a directory (default: "
        "<adapter>-pruned beside the input), or for a single-file adapter the file (default: "
        "<name>-pruned.safetensors)."),
    tau: Optional[int] = typer.Option(None, "--tau", help=f"Prune the tau highest-SSI layers, the paper's top-tau "
                                      f"(Eq. 5), at least 1 (default: {DEFAULT_TAU}, unless --threshold or "
                                      "--fraction)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Prune every layer with SSI >= this (0-1)."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Prune the top fraction of layers by SSI "
                                             "(0-1], rounded up: 0.1 of 25 layers prunes 3."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Allow a --tau above the number of scored layers, "
                                     "or a selection of more than half of them (refused otherwise)."),
    mode: ModeName = typer.Option(ModeName.ZERO, "--mode", help="zero: set lora_B to zeros (the paper's "
                                  "operation); drop: remove the layers' tensors and exclude their modules."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be pruned; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace the output adapter directory if it exists."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format (to stdout): table, json, "
                               "markdown or csv."),
    verbose: bool = VERBOSE,
    method: MethodName = typer.Option(MethodName.MAS_SVD, "--method", help="Spectral method: mas-svd (the paper), "
                                      "spsvd or svd."),
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    exhaustive: bool = EXHAUSTIVE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    quiet: bool = QUIET,
    input_format: InputFormat = INPUT_FORMAT,
    adapter_name: Optional[str] = ADAPTER_NAME,
    revision: Optional[str] = REVISION,
) -> None:
    """Zero (or drop) the LoRA update of the highest-SSI layers; the frozen base weights are untouched."""
    from s3lora_cli import report
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.pruning import PruneMode, prune_adapter, prune_document
    from s3lora_cli.scoring import ScoreOptions
    from s3lora_cli.selection import Selection

    selection = Selection.of(tau, threshold, fraction, allow_large)
    path = resolve_adapter_path(adapter, revision)
    options = ScoreOptions(method=method.method(), components=components, top_h=top_h, exhaustive=exhaustive,
                           device=device, dtype=dtype, input_format=input_format.value, adapter_name=adapter_name)
    with progress_bar(quiet) as progress:
        result = prune_adapter(path, output, selection, PruneMode(mode.value), options, force=force,
                               dry_run=dry_run, progress=progress)
    marked = set(result.modules)
    where = "written to" if result.written else "dry run: would be written to"
    described = f"{selection.option()} ({selection.describe()}), --mode {mode.value}; {where} {result.output}"
    if fmt is Format.json:
        write_output(report.render_json(prune_document(result)), None, False)
    elif fmt is Format.markdown:
        write_output(report.render_markdown(result.report, marked, selection.tau, report.PRUNED,
                                            selection=described), None, False)
    elif fmt is Format.csv:
        write_output(report.render_csv(result.report, marked, report.PRUNED), None, False)
    else:
        write_output(report.render_table(result.report, marked, report.PRUNED, selection=described,
                                         width=table_width(), only_marked=not verbose), None, False)
    if not quiet:
        print_summary(_summary(result))


def _summary(result) -> list[str]:
    from s3lora_cli.pruning import PruneMode
    from s3lora_cli.selection import percent

    lines = [f"note: {p.module}: {p.note}" for p in result.pruned if p.note]
    counts = ", ".join(f"{sum(p.action is m for p in result.pruned)} {m.value}" for m in PruneMode)
    scored = sum(s.ssi is not None for s in result.report.layers)
    taken = f"{len(result.pruned)} of {scored} scored layers ({percent(len(result.pruned), scored)})"
    verb = "pruned" if result.written else "dry run: would prune"
    where = f"wrote {result.output}" if result.written else f"would write {result.output}; nothing was written"
    lines.append(f"{verb} {taken}, {result.selection.describe()}: {counts}; {where}")
    lines.append("next: evaluate the pruned adapter on your tasks (utility) and on your safety checks, against the "
                 "original.")
    return lines
