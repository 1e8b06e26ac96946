"""The s3lora command line: the Typer app, the error boundary that maps errors to exit codes, and the
helpers the commands share. Each command lives in its own module of this package."""

from __future__ import annotations

import ctypes
import enum
import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from s3lora_cli import __version__
from s3lora_cli.adapters.writer import write_text_atomic
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME = 0, 1, 2, 3, 4
DEMO_ADAPTER = Path(__file__).resolve().parent.parent / "demo"

app = typer.Typer(
    name="s3lora",
    help="Audit LoRA adapters for sharp, risky updates (S3LoRA: MAS-SVD + Spectral Sharpness Index), "
    "without the base model and without data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options shared by the commands that score (one definition each).
COMPONENTS = typer.Option(None, "--components", "-M", help="M, rank-1 components (default: min(8, r)).")
TOP_H = typer.Option(None, "--top-h", help="h, singular values in SSI's denominator (default: M).")
EXHAUSTIVE = typer.Option(False, "--exhaustive", help="Evaluate every candidate pair exactly (no screening).")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DTYPE = typer.Option("float32", "--dtype", help="Compute dtype of the L1 fit: float32 or float64.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr.")

# The gate's options (check, scan, admit); a policy file or [tool.s3lora] supplies what they leave unset.
MAX_SSI = typer.Option(None, "--max-ssi", help="Fail a layer whose SSI is above this.")
MAX_FLAGGED = typer.Option(None, "--max-flagged",
                           help="How many layers may exceed --max-ssi before the gate fails (default 0).")
BASELINE = typer.Option(None, "--baseline",
                        help="Approved adapter to compare with, layer by layer (matched by module name).")
MAX_INCREASE = typer.Option(None, "--max-increase",
                            help="Fail a layer whose SSI rose by more than this over --baseline.")
STRICT_LAYERS = typer.Option(None, "--strict-layers/--no-strict-layers", help="Also fail on layers new in, or "
                             "missing from, the adapter vs --baseline (default: only report them).")
POLICY = typer.Option(None, "--policy",
                      help="TOML policy file, read instead of pyproject.toml's \\[tool.s3lora]; flags win.")
GATE_METHOD = typer.Option(None, "--method", help="Spectral method (default mas-svd).")


def gate_flags(max_ssi, max_flagged, baseline, max_increase, strict_layers, method, components, top_h) -> dict:
    """The gate's command-line values, by the names the policy file uses (None: not given)."""
    return {"max-ssi": max_ssi, "max-flagged": max_flagged, "baseline": baseline, "max-increase": max_increase,
            "strict-layers": strict_layers, "method": method, "components": components, "top-h": top_h}


class InputFormat(str, enum.Enum):
    auto = "auto"
    peft = "peft"
    kohya = "kohya"
    diffusers = "diffusers"
    mlx = "mlx"


INPUT_FORMAT = typer.Option(InputFormat.auto, "--input-format",
                            help="Adapter format: auto (detect), peft, kohya, diffusers or mlx.")
ADAPTER_NAME = typer.Option(None, "--adapter", help="Which of several PEFT adapters saved in one directory "
                            "(its adapter_name; 'default' is the directory's own).")


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(code: int, message: str) -> typer.Exit:
    stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
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
    write_text_atomic(output, text)


@contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar on stderr; yields the callback score_adapter calls after each layer."""
    if quiet:
        yield None
        return
    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=stderr_console(), transient=True)
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


def run() -> None:
    """Console-script entry point."""
    _keep_freed_memory()
    app()


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system at once.

    The L1 fit forms its residual in fresh chunks of 4 MiB for every layer; mapping and zeroing new pages for
    them cost ~10 % of the fit of a 4096 x 4096 layer (measured). Peak memory stays what the largest layer
    needs (the pages kept are the ones the next layer reuses). Nothing happens where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_trim_threshold, 1 << 30)  # keep up to 1 GiB of free memory at the top of the heap
    mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MiB (glibc's most) from the heap, not mmap


# The commands register themselves on ``app`` when imported, in the order --help lists them.
from s3lora_cli.cli import score as _score  # noqa: E402,F401,I001
from s3lora_cli.cli import prune as _prune  # noqa: E402,F401
from s3lora_cli.cli import check as _check  # noqa: E402,F401
from s3lora_cli.cli import scan as _scan  # noqa: E402,F401
from s3lora_cli.cli import admit as _admit  # noqa: E402,F401
from s3lora_cli.cli import eval as _eval  # noqa: E402,F401
