"""The s3lora command line: parses options, calls the library, renders, and maps errors to exit codes."""

from __future__ import annotations

import enum
import functools
import io
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from s3lora_cli import __version__, report
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError
from s3lora_cli.policy import DEFAULT_TAU, top_tau
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.spectral import Method

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME = 0, 1, 2, 3, 4
DEMO_ADAPTER = Path(__file__).parent / "demo"

app = typer.Typer(
    name="s3lora",
    help="Audit LoRA adapters for sharp, risky updates (S3LoRA: MAS-SVD + Spectral Sharpness Index), "
    "without the base model and without data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(code: int, message: str) -> typer.Exit:
    _stderr().print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def error_boundary(command):
    """Map every exception to a documented exit code with a one-line message; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UsageError as exc:
            raise _fail(EXIT_USAGE, str(exc)) from None
        except AdapterInputError as exc:
            raise _fail(EXIT_INPUT, str(exc)) from None
        except (RuntimeProblem, S3LoraError) as exc:
            raise _fail(EXIT_RUNTIME, str(exc)) from None
        except KeyboardInterrupt:
            raise _fail(130, "interrupted; nothing was written") from None
        except MemoryError:
            raise _fail(EXIT_RUNTIME, "out of memory; try --device cpu, or a machine with more memory") from None
        except Exception as exc:  # a bug or an environment problem: never let it look like a failed gate
            raise _fail(EXIT_RUNTIME, f"internal error: {type(exc).__name__}: {exc}. Please report it.") from None

    return wrapper


def check_output(output: Optional[Path], force: bool) -> None:
    """Refuse, before any work, an output file that exists (without --force) or is a directory."""
    if output is not None and output.is_dir():
        raise UsageError(f"{output} is a directory; -o takes a file name")
    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")


def write_output(text: str, output: Optional[Path], force: bool) -> None:
    """Write ``text`` to stdout, or atomically to ``output`` (temp file beside it, then rename)."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    check_output(output, force)
    parent = output.parent if str(output.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar on stderr; yields the callback score_adapter calls after each layer."""
    if quiet:
        yield None
        return
    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=_stderr(), transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, layer) -> None:
            bar.update(task, completed=done, total=total, description=layer.module)

        yield update


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s3lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Audit LoRA adapters for sharp, risky updates."""


@app.command()
@error_boundary
def score(
    adapter: Optional[Path] = typer.Argument(None, help="Adapter directory, or its adapter_model.safetensors."),
    demo: bool = typer.Option(False, "--demo", help="Score the small demo adapter bundled with s3lora."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    method: Method = typer.Option(Method.MAS_SVD, "--method", help="Spectral method (paper Table 5)."),
    components: Optional[int] = typer.Option(None, "--components", "-M", help="M, rank-1 components [default: min(8, r)]."),
    top_h: Optional[int] = typer.Option(None, "--top-h", help="h, singular values in SSI's denominator [default: M]."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Evaluate every candidate pair exactly (no screening)."),
    tau: int = typer.Option(DEFAULT_TAU, "--tau", help="Mark the top-tau layers by SSI (what prune would remove)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32 or float64."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    """Rank every LoRA layer of an adapter by its Spectral Sharpness Index (highest first)."""
    path = _adapter_path(adapter, demo)
    check_output(output, force)
    options = ScoreOptions(method=method, components=components, top_h=top_h, exhaustive=exhaustive,
                           device=device, dtype=dtype)
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
        _stderr().print(report.summary_line(result, flagged, tau), soft_wrap=True)
        for s in result.layers:
            if s.error:
                _stderr().print(f"warning: {s.module}: {s.error}", soft_wrap=True)


def _adapter_path(adapter: Optional[Path], demo: bool) -> Path:
    if demo and adapter is not None:
        raise UsageError("give an adapter path or --demo, not both")
    if demo:
        return DEMO_ADAPTER
    if adapter is None:
        raise UsageError("missing the adapter path (or pass --demo to score the bundled demo adapter)")
    return adapter


def run() -> None:
    """Console-script entry point."""
    app()
