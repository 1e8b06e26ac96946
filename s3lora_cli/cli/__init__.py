"""The s3lora command line: the Typer ``app`` (app.py) and its commands, one module each (score, prune, check,
scan, admit, adapt, eval), the options they share (options.py), where their output goes (output.py), and the
error boundary that maps errors to exit codes (boundary.py).

Only Typer is imported here and by the commands' modules at import time: PyTorch, numba and Rich are
imported when a command runs, so that ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

from s3lora_cli.cli.app import DEMO_ADAPTER, app, run
from s3lora_cli.cli.boundary import ExitCode, Terminated, error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_COMPONENTS,
    DEFAULT_TAU,
    Format,
    InputFormat,
    MethodName,
    PolicyFile,
    Quiet,
    as_default,
    gate_flags,
)
from s3lora_cli.cli.output import (
    check_apart,
    check_output,
    print_summary,
    progress_bar,
    stderr_console,
    table_width,
    write_output,
)

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME = (
    ExitCode.OK,
    ExitCode.GATE_FAILED,
    ExitCode.USAGE,
    ExitCode.INPUT,
    ExitCode.RUNTIME,
)
EXIT_SIGINT, EXIT_SIGTERM = ExitCode.INTERRUPTED, ExitCode.TERMINATED

# The shared options in the parameter-default style (``quiet: bool = QUIET``), the same definitions as options.py's.
QUIET = as_default(Quiet, False)
POLICY = as_default(PolicyFile, None)

# The commands register themselves on ``app`` when imported, in the order --help lists them.
from s3lora_cli.cli import score as _score  # noqa: E402,F401,I001
from s3lora_cli.cli import prune as _prune  # noqa: E402,F401
from s3lora_cli.cli import check as _check  # noqa: E402,F401
from s3lora_cli.cli import scan as _scan  # noqa: E402,F401
from s3lora_cli.cli import admit as _admit  # noqa: E402,F401
from s3lora_cli.cli import adapt as _adapt  # noqa: E402,F401
from s3lora_cli.cli import adapt_loop as _adapt_loop  # noqa: E402,F401  (adapt train, answer, refresh, run)
from s3lora_cli.cli import eval as _eval  # noqa: E402,F401

__all__ = [
    "DEFAULT_COMPONENTS",
    "DEFAULT_TAU",
    "DEMO_ADAPTER",
    "EXIT_GATE_FAILED",
    "EXIT_INPUT",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "POLICY",
    "QUIET",
    "ExitCode",
    "Format",
    "InputFormat",
    "MethodName",
    "Terminated",
    "app",
    "check_apart",
    "check_output",
    "error_boundary",
    "gate_flags",
    "print_summary",
    "progress_bar",
    "run",
    "stderr_console",
    "table_width",
    "write_output",
]
