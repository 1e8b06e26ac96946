"""``s3lora prune``: write a copy of an adapter with the LoRA updates of its highest-SSI layers removed."""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_TAU,
    FORMAT,
    AdapterArgument,
    AdapterName,
    Components,
    Device,
    Dtype,
    Exhaustive,
    Force,
    Format,
    Fraction,
    InputFormat,
    InputFormatOption,
    MethodOption,
    Quiet,
    Revision,
    Threshold,
    TopH,
    Verbose,
    score_options,
)
from s3lora_cli.cli.output import Target, print_summary, progress_bar, table_width


class ModeName(str, enum.Enum):
    """The --mode choices: the values of ``pruning.PruneMode`` (a test keeps them equal)."""

    ZERO = "zero"
    DROP = "drop"


PrunedOutput = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Where to write the pruned adapter, in the input's format: a directory (default: <adapter>-pruned "
        "beside the input), or for a single-file adapter the file (default: <name>-pruned.safetensors).",
    ),
]
Tau = Annotated[
    Optional[int],
    typer.Option(
        "--tau",
        help=f"Prune the tau highest-SSI layers, the paper's top-tau (Eq. 5), at least 1 (default: {DEFAULT_TAU}, "
        "unless --threshold or --fraction).",
    ),
]
AllowLarge = Annotated[
    bool,
    typer.Option(
        "--allow-large",
        help="Allow a --tau above the number of scored layers, or a selection of more than half of them (refused "
        "otherwise).",
    ),
]
Mode = Annotated[
    ModeName,
    typer.Option(
        "--mode",
        help="zero: set lora_B to zeros (the paper's operation); drop: remove the layers' tensors and exclude "
        "their modules.",
    ),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be pruned; write nothing.")]


@app.command()
@error_boundary
def prune(
    adapter: AdapterArgument,
    output: PrunedOutput = None,
    tau: Tau = None,
    threshold: Threshold = None,
    fraction: Fraction = None,
    allow_large: AllowLarge = False,
    mode: Mode = ModeName.ZERO,
    dry_run: DryRun = False,
    force: Force = False,
    fmt: Annotated[Format, FORMAT] = Format.table,
    verbose: Verbose = False,
    method: MethodOption = None,
    components: Components = None,
    top_h: TopH = None,
    exhaustive: Exhaustive = False,
    device: Device = "auto",
    dtype: Dtype = "float32",
    quiet: Quiet = False,
    input_format: InputFormatOption = InputFormat.auto,
    adapter_name: AdapterName = None,
    revision: Revision = None,
) -> None:
    """Zero (or drop) the LoRA update of the highest-SSI layers; the frozen base weights are untouched. The
    report goes to stdout."""
    from s3lora_cli.adapters.detect import resolve_adapter_path
    from s3lora_cli.pruning import PruneMode, prune_adapter
    from s3lora_cli.selection import Selection

    selection = Selection.of(tau, threshold, fraction, allow_large)
    path = resolve_adapter_path(adapter, revision)
    options = score_options(method, components, top_h, exhaustive, device, dtype, input_format, adapter_name)
    with progress_bar(quiet) as progress:
        result = prune_adapter(
            path, output, selection, PruneMode(mode.value), options, force=force, dry_run=dry_run, progress=progress
        )
    Target().render(fmt, _renderers(result, verbose))
    if not quiet:
        print_summary(_summary(result))


def _renderers(result: Any, verbose: bool) -> dict[Format, Callable[[], str]]:
    """The report of a prune in each format, to stdout (``-o`` names the pruned adapter)."""
    from s3lora_cli import report
    from s3lora_cli.pruning import prune_document

    marked, tau = set(result.modules), result.selection.tau
    where = "written to" if result.written else "dry run: would be written to"
    described = f"{result.selection.option()} ({result.selection.describe()}), --mode {result.mode.value}; " + (
        f"{where} {result.output}"
    )
    return {
        Format.json: lambda: report.render_json(prune_document(result)),
        Format.markdown: lambda: report.render_markdown(result.report, marked, tau, report.PRUNED, selection=described),
        Format.csv: lambda: report.render_csv(result.report, marked, report.PRUNED),
        Format.table: lambda: report.render_table(
            result.report, marked, report.PRUNED, selection=described, width=table_width(), only_marked=not verbose
        ),
    }


def _summary(result: Any) -> list[str]:
    from s3lora_cli.pruning import PruneMode
    from s3lora_cli.selection import percent

    lines = [f"note: {p.module}: {p.note}" for p in result.pruned if p.note]
    counts = ", ".join(f"{sum(p.action is m for p in result.pruned)} {m.value}" for m in PruneMode)
    scored = sum(s.ssi is not None for s in result.report.layers)
    taken = f"{len(result.pruned)} of {scored} scored layers ({percent(len(result.pruned), scored)})"
    verb = "pruned" if result.written else "dry run: would prune"
    where = f"wrote {result.output}" if result.written else f"would write {result.output}; nothing was written"
    lines.append(f"{verb} {taken}, {result.selection.describe()}: {counts}; {where}")
    lines.append(
        "next: evaluate the pruned adapter on your tasks (utility) and on your safety checks, against the original."
    )
    return lines
