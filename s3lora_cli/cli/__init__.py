"""The s3lora command line: the Typer app, the error boundary that maps errors to exit codes, and the
helpers the commands share. Each command lives in its own module of this package.

Only Typer is imported here and by the commands' modules at import time: PyTorch, numba and Rich are
imported when a command runs, so that ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from typer import Abort
from typer.core import TyperGroup

try:  # Typer 0.2x vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older Typer, with click itself
    from click.exceptions import ClickException, NoArgsIsHelpError

from s3lora_cli import __version__
from s3lora_cli.durable import write_file_atomic
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError, describe_os_error

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
DEMO_ADAPTER = Path(__file__).resolve().parent.parent / "demo"


class OneLineErrors(TyperGroup):
    """The command group; a usage error (an unknown option, a missing argument, a bad value) is one line on
    stderr, ``error: <what> (see 's3lora <command> --help')``, and exit code 2, as every other error is one line."""

    def get_help_option(self, ctx):
        # --help, not given, is None; Typer would load pydantic (a tenth of a second) to coerce that to a bool
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            sys.stdout.write(exc.format_message() + "\n")
            code = EXIT_OK
        except ClickException as exc:
            words = sys.argv[1:] if args is None else list(args)
            command = next((word for word in words if word in self.commands), None)
            sys.stderr.write(usage_error_line(exc, f"{self.name} {command}" if command else self.name) + "\n")
            code = EXIT_USAGE  # never 1, which would read as a failed gate
        except Abort:
            sys.stderr.write("error: interrupted; nothing was written\n")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def usage_error_line(exc: ClickException, command: str) -> str:
    """One line for a usage error: its message (on one line) and where the help of its ``command`` is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"error: {message} (see '{ctx.command_path if ctx is not None else command} --help')"


app = typer.Typer(
    name="s3lora",
    cls=OneLineErrors,
    help="Audit LoRA adapters for sharp, risky updates (S3LoRA: MAS-SVD + Spectral Sharpness Index), "
    "without the base model and without data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class MethodName(str, enum.Enum):
    """The --method choices: the values of ``spectral.Method`` (a test keeps them equal), named here so that
    parsing the command line does not import the math."""

    MAS_SVD = "mas-svd"
    SPSVD = "spsvd"
    SVD = "svd"

    def method(self):
        from s3lora_cli.spectral import Method

        return Method(self.value)


# Defaults of the library that the options' help names (a test keeps them equal to the library's).
DEFAULT_TAU = 10
DEFAULT_COMPONENTS = 8


# Options shared by the commands that score (one definition each).
COMPONENTS = typer.Option(None, "--components", "-M", help="M, the rank-1 components of the L1 fit "
                          f"(default: min({DEFAULT_COMPONENTS}, r), r the layer's rank).")
TOP_H = typer.Option(None, "--top-h", help="h, the singular values in SSI's denominator (default: M).")
EXHAUSTIVE = typer.Option(False, "--exhaustive", help="Evaluate every candidate pair exactly, without "
                          "screening (same result, slower).")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.")
DTYPE = typer.Option("float32", "--dtype", help="Compute dtype of the L1 fit: float32 or float64.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar, summary or warnings on stderr.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Print every layer, not only the layers that matter.")

# The gate's options (check, scan, admit); a policy file or [tool.s3lora] supplies what they leave unset.
MAX_SSI = typer.Option(None, "--max-ssi", help="A layer whose SSI is above this is a violation (default: no "
                       "such rule).")
MAX_VIOLATIONS = typer.Option(None, "--max-violations", "--max-flagged", help="How many layers may exceed --max-ssi "
                              "(violations tolerated) before the gate fails (default: 0).")
BASELINE = typer.Option(None, "--baseline",
                        help="Approved adapter to compare with, layer by layer (matched by module name).")
MAX_INCREASE = typer.Option(None, "--max-increase",
                            help="A layer whose SSI rose by more than this over --baseline is a violation.")
STRICT_LAYERS = typer.Option(None, "--strict-layers/--no-strict-layers", help="Also fail on layers new in, or "
                             "missing from, the adapter vs --baseline (default: only report them).")
POLICY = typer.Option(None, "--policy",
                      help="TOML policy file, read instead of pyproject.toml's [tool.s3lora] table; flags win.")
GATE_METHOD = typer.Option(None, "--method", help="Spectral method: mas-svd (the paper), spsvd or svd "
                          "(default: mas-svd).")


def gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers, method, components, top_h) -> dict:
    """The gate's command-line values, by the names the policy file uses (None: not given)."""
    return {"max-ssi": max_ssi, "max-violations": max_violations, "baseline": baseline, "max-increase": max_increase,
            "strict-layers": strict_layers, "method": method, "components": components, "top-h": top_h}


class InputFormat(str, enum.Enum):
    auto = "auto"
    peft = "peft"
    kohya = "kohya"
    diffusers = "diffusers"
    mlx = "mlx"


INPUT_FORMAT = typer.Option(InputFormat.auto, "--input-format",
                            help="Adapter format: auto (detect), peft, kohya, diffusers or mlx.")
REVISION = typer.Option(None, "--revision", help="For a Hugging Face Hub id (org/name): the cached revision to "
                        "read, a branch, tag or commit (default: main).")
ADAPTER_NAME = typer.Option(None, "--adapter", help="Which of several PEFT adapters saved in one directory "
                            "(its adapter_name; 'default' is the directory's own).")


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(code: int, message: str) -> typer.Exit:
    from rich.markup import escape

    stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancellation, ``docker stop``, ``timeout``), raised where the program is, like Ctrl-C, so that
    every write path removes its temporary files on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt():
    """Handle SIGTERM like SIGINT while a command runs (only in the main thread, where handlers can be set)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_boundary(command):
    """Map every exception to a documented exit code with a one-line message; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt():
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UsageError as exc:
            raise _fail(EXIT_USAGE, str(exc)) from None
        except AdapterInputError as exc:
            raise _fail(EXIT_INPUT, str(exc)) from None
        except (RuntimeProblem, S3LoraError) as exc:
            raise _fail(EXIT_RUNTIME, str(exc)) from None
        except KeyboardInterrupt as exc:
            code, name = (EXIT_SIGTERM, "SIGTERM") if isinstance(exc, Terminated) else (EXIT_SIGINT, "SIGINT")
            said = str(exc) or ("interrupted; no output was left half-written (an output completed before the "
                                "interruption is kept)")
            raise _fail(code, f"{said} ({name})") from None
        except MemoryError:
            raise _fail(EXIT_RUNTIME, "out of memory; try --device cpu, or a machine with more memory") from None
        except OSError as exc:  # the environment (no space, read-only, permissions, a name too long), not a bug
            raise _fail(EXIT_RUNTIME, describe_os_error(exc)) from None
        except Exception as exc:  # a bug: never let it look like a failed gate
            raise _fail(EXIT_RUNTIME, f"internal error: {type(exc).__name__}: {_first_line(exc)}. Please report it."
                        ) from None

    return wrapper


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def check_apart(outputs: dict[str, Optional[Path]], inputs: list[Path]) -> None:
    """Refuse an output that is, or resolves (through symlinks) to, an input adapter's file, or that lies inside
    an input adapter's directory; and two output options naming one file. ``outputs``: option -> path (None: not
    given); ``inputs``: the adapters as given (a directory, or a weights file whose config lies beside it)."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        target = Path(os.path.abspath(path)).resolve()
        if target in seen:
            raise UsageError(f"{option} {path} is also {seen[target]}; give each output its own file")
        seen[target] = option
        for adapter in inputs:
            if not os.path.lexists(adapter):
                continue
            source = Path(adapter).resolve()
            files = [source, source.parent / "adapter_config.json"] if source.is_file() else []
            if target in files or (source.is_dir() and (target == source or source in target.parents)):
                raise UsageError(f"{option} {path} is a file of the input adapter {adapter}"
                                 f"{f' (it resolves to {target})' if target != Path(os.path.abspath(path)) else ''}; "
                                 "the input is never written to: give another path")


def check_output(output: Optional[Path], force: bool) -> None:
    """Refuse, before any work, an output file that exists (without --force) or is a directory."""
    if output is not None and output.is_dir():
        raise UsageError(f"{output} is a directory; -o takes a file name")
    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")


def write_output(text: str, output: Optional[Path], force: bool) -> None:
    """Write ``text`` to stdout, or atomically to ``output`` (temp file beside it, fsynced, then renamed)."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    check_output(output, force)
    try:  # without --force, also a file that appeared while the command ran is never replaced
        write_file_atomic(output, lambda fh: fh.write(text.encode("utf-8")), replace=force)
    except FileExistsError:
        raise UsageError(f"{output} exists; pass --force to overwrite it") from None


@contextmanager
def progress_bar(quiet: bool):
    """A Rich progress bar on stderr, when stderr is a terminal; yields the callback score_adapter calls after
    each layer (None: no bar)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=stderr_console(), transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, layer) -> None:
            bar.update(task, completed=done, total=total, description=layer.module)

        yield update


def table_width() -> int | None:
    """The width tables are laid out for: $COLUMNS when set, else the terminal's width when stdout is a
    terminal, else None (a pipe or a file gets full rows)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return None


def print_summary(lines) -> None:
    """Summary and warning lines to stderr: each one line, or, on a terminal, wrapped at its width between words."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size().columns if sys.stderr.isatty() else None
    for line in lines:
        wrapped = textwrap.wrap(line, width, subsequent_indent="  ", break_long_words=False) if width else [line]
        sys.stderr.write("\n".join(wrapped or [""]) + "\n")
    sys.stderr.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s3lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Audit LoRA adapters for sharp, risky updates: rank the layers of an adapter by S3LoRA's Spectral Sharpness
    Index (SSI), prune the sharpest, and gate adapters in CI."""


def run() -> None:
    """Console-script entry point."""
    from s3lora_cli import cores

    cores.prepare_process()  # before PyTorch or numba start their thread pools
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
from s3lora_cli.cli import adapt as _adapt  # noqa: E402,F401
from s3lora_cli.cli import eval as _eval  # noqa: E402,F401
