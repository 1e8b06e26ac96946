"""The Typer app every command registers on: one-line usage errors with exit code 2, the global options
(--version, --debug), and the console-script entry point."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import Abort
from typer.core import TyperGroup

try:  # Typer 0.2x vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older Typer, with click itself
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

from s3lora_cli._version import __version__
from s3lora_cli.cli.boundary import DEBUG_VARIABLE, Debug, ExitCode

DEMO_ADAPTER = Path(__file__).resolve().parent.parent / "demo"


class OneLineErrors(TyperGroup):
    """The command group; a usage error (an unknown option, a missing argument, a bad value) is one line on
    stderr, ``error: <what> (see 's3lora <command> --help')``, and exit code 2, as every other error is one line."""

    def get_help_option(self, ctx: Any) -> Any:
        # --help, not given, is None; Typer would load pydantic (a tenth of a second) to coerce that to a bool
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except NoArgsIsHelpError as exc:
            sys.stdout.write(exc.format_message() + "\n")
            code = ExitCode.OK
        except ClickException as exc:
            words = sys.argv[1:] if args is None else list(args)
            command = next((word for word in words if word in self.commands), None)
            name = self.name or "s3lora"
            sys.stderr.write(usage_error_line(exc, f"{name} {command}" if command else name) + "\n")
            code = ExitCode.USAGE  # never 1, which would read as a failed gate
        except Abort:
            sys.stderr.write("error: interrupted; nothing was written\n")
            code = ExitCode.INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else ExitCode.OK)


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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"s3lora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the traceback of an internal error (also {DEBUG_VARIABLE}=1)."),
    ] = False,
) -> None:
    """Audit LoRA adapters for sharp, risky updates: rank the layers of an adapter by S3LoRA's Spectral Sharpness
    Index (SSI), prune the sharpest, and gate adapters in CI."""
    Debug.switch = debug


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
