"""``s3lora eval``: the adapter, the base model and the pruned adapter side by side on the same prompts (the
``eval`` extra; the evaluation subpackage and transformers are imported only when the command runs)."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_TAU,
    FORMAT,
    AdapterName,
    Components,
    Device,
    Force,
    Format,
    Fraction,
    MethodOption,
    Output,
    Quiet,
    Threshold,
    TopH,
    score_options,
)
from s3lora_cli.cli.output import Target, check_output, stderr_console
from s3lora_cli.errors import UsageError

DEFAULT_MAX_NEW_TOKENS, DEFAULT_BATCH_SIZE = 32, 16
"""The defaults of s3lora_cli.evaluation.runner, repeated so that this module need not import it (a test keeps them
equal)."""


@app.command("eval")
@error_boundary
def eval_command(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory (or its weights file)."),
    base: Path = typer.Option(..., "--base", help="Base model: a Hugging Face model directory or a .gguf file."),
    tasks: Path = typer.Option(..., "--tasks", help='JSONL, one {"prompt": ..., "answer": ...} per line.'),
    pruned: Optional[Path] = typer.Option(
        None,
        "--pruned",
        help="A pruned adapter to compare (e.g. the output of s3lora prune) instead of pruning on the fly.",
    ),
    tau: Optional[int] = typer.Option(
        None,
        "--tau",
        help=f"Prune the tau highest-SSI layers on the fly (default: "
        f"{DEFAULT_TAU}, unless --threshold, --fraction, --pruned or --sweep-tau).",
    ),
    threshold: Threshold = None,
    fraction: Fraction = None,
    sweep_tau: Optional[str] = typer.Option(
        None,
        "--sweep-tau",
        help="Also evaluate the adapter pruned at each of these tau values, e.g. 0,2,4,10 (the utility curve).",
    ),
    refusals: Optional[Path] = typer.Option(
        None, "--refusals", help='JSONL of {"prompt": ...}: report the share of answers that refuse.'
    ),
    refusal_markers: Optional[Path] = typer.Option(
        None, "--refusal-markers", help="File of refusal markers, one per line (default: the built-in list)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N tasks (and refusal prompts)."),
    strict: bool = typer.Option(
        False, "--strict", help="A bad line in a tasks file is an error (default: skipped with a warning)."
    ),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", help="Greedy answer length."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="Prompts per forward pass."),
    chat_template: bool = typer.Option(
        True,
        "--chat-template/--no-chat-template",
        help="Wrap each prompt as a user turn with the tokenizer's chat template (when it has one).",
    ),
    fmt: Annotated[Format, FORMAT] = Format.table,
    output: Output = None,
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Write the --sweep-tau utility curve to this PNG file (needs matplotlib)."
    ),
    force: Force = False,
    method: MethodOption = None,
    components: Components = None,
    top_h: TopH = None,
    device: Device = "auto",
    quiet: Quiet = False,
    adapter_name: AdapterName = None,
) -> None:
    """Evaluate base, adapter and pruned adapter side by side on your prompts (needs the eval extra)."""
    from s3lora_cli import evaluation
    from s3lora_cli.evaluation import render

    sweep = evaluation.parse_sweep(sweep_tau) if sweep_tau is not None else ()
    selection = _selection(tau, threshold, fraction, pruned, sweep)
    if plot is not None and not sweep:
        raise UsageError("--plot draws the --sweep-tau curve; give --sweep-tau too")
    _check_outputs([output, plot], force, [adapter, base, tasks, pruned, refusals, refusal_markers])
    if plot is not None:
        evaluation.require_libraries("matplotlib")
    markers = (
        evaluation.read_markers(refusal_markers) if refusal_markers is not None else evaluation.DEFAULT_REFUSAL_MARKERS
    )
    options = evaluation.EvalOptions(
        tasks=tasks,
        refusals=refusals,
        refusal_markers=markers,
        selection=selection,
        pruned=pruned,
        sweep_tau=sweep,
        limit=limit,
        strict=strict,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        device=device,
        adapter_name=adapter_name,
        score=score_options(method, components, top_h),
    )
    _quiet_transformers()
    with _progress(quiet) as progress:
        result = evaluation.evaluate(adapter, base, options, progress)
    _render(result, fmt, Target(output, force))
    if plot is not None:
        Target(plot, force).write(render.render_plot(result))
    if not quiet:
        _summary(result, plot)


def _selection(
    tau: Optional[int],
    threshold: Optional[float],
    fraction: Optional[float],
    pruned: Optional[Path],
    sweep: tuple[int, ...],
) -> Any:
    """The layers to prune on the fly (None: --pruned, or only the sweep)."""
    from s3lora_cli.selection import Selection

    given = any(v is not None for v in (tau, threshold, fraction))
    if given and pruned is not None:
        raise UsageError("give --pruned or --tau / --threshold / --fraction, not both")
    if not given and (pruned is not None or sweep):
        return None
    # eval writes nothing, so a selection of most of the adapter is measured rather than refused (as prune does)
    return Selection.of(tau, threshold, fraction, allow_large=True)


def _render(result: Any, fmt: Format, target: Target) -> None:
    from rich.console import Console

    from s3lora_cli.evaluation import render

    if fmt is Format.table and target.path is None:
        Console(width=None if sys.stdout.isatty() else 200).print(render.render_table(result))
        return
    target.render(
        fmt,
        {
            Format.json: lambda: render.render_json(result),
            Format.markdown: lambda: render.render_markdown(result),
            Format.csv: lambda: render.render_csv(result),
            Format.table: lambda: _table_text(result),
        },
    )


def _table_text(result: Any) -> str:
    from rich.console import Console

    from s3lora_cli.evaluation import render

    recorder = Console(record=True, width=160, file=io.StringIO())
    recorder.print(render.render_table(result))
    return str(recorder.export_text())


def _summary(result, plot: Optional[Path]) -> None:
    from s3lora_cli.evaluation import render

    err = stderr_console()
    err.print(render.summary_line(result), soft_wrap=True)
    for task_file in filter(None, (result.tasks, result.refusals)):
        for bad in task_file.skipped[:5]:
            err.print(f"warning: {task_file.path}:{bad.line}: {bad.reason}; skipped", soft_wrap=True)
        if len(task_file.skipped) > 5:
            err.print(
                f"warning: {task_file.path}: {len(task_file.skipped) - 5} more bad line(s) skipped", soft_wrap=True
            )
    for r in result.variants:
        if r.variant.pruned and r.variant.kind.value == "pruned":
            err.print(f"{r.variant.name}: {len(r.variant.pruned)} layer(s) off ({r.variant.selection})", soft_wrap=True)
    if plot is not None:
        err.print(f"wrote {plot}", soft_wrap=True)


def _check_outputs(outputs: list[Optional[Path]], force: bool, inputs: list[Optional[Path]]) -> None:
    """Refuse, before any work, an output that exists without --force, or that is or lies inside an input."""
    given = [o for o in outputs if o is not None]
    if len(given) == 2 and given[0].resolve() == given[1].resolve():
        raise UsageError(f"--output and --plot are the same file {given[0]}")
    for out in given:
        check_output(out, force)
        target = out.resolve()
        for source in filter(None, inputs):
            source = source.resolve()
            if target == source or source in target.parents:
                raise UsageError(f"{out} is an input of this run ({source}); write the output elsewhere")


def _quiet_transformers() -> None:
    """transformers' own progress bars, advice and deprecation notices (about its own next versions) would mix
    with s3lora's stderr."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers
    except ImportError:
        return  # evaluate() says how to install it
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class _progress:
    """A Rich progress bar on stderr over the batches of every variant; the callback evaluate() calls."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = (
            None
            if quiet
            else Progress(
                TextColumn("evaluating"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=stderr_console(),
                transient=True,
            )
        )

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.__enter__()
        bar = self.bar
        task = bar.add_task("loading", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
