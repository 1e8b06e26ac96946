"""The error boundary of every command: each exception mapped to a documented exit code (``ExitCode``) with a
one-line message on stderr, never a traceback (``--debug`` or ``S3LORA_DEBUG=1`` adds the traceback of an
internal error); SIGTERM handled like Ctrl-C so that every write path cleans up on the way out."""

from __future__ import annotations

import enum
import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer

from s3lora_cli.cli.output import print_error
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError, describe_os_error, first_line

DEBUG_VARIABLE = "S3LORA_DEBUG"
C = TypeVar("C", bound=Callable[..., Any])


class ExitCode(enum.IntEnum):
    """The exit codes, as README.md's table documents them."""

    OK = 0  # success; for a gate: it passed
    GATE_FAILED = 1  # the gate failed (never a crash)
    USAGE = 2  # unknown or conflicting options, an output that exists without --force
    INPUT = 3  # the adapter (or another input) cannot be read
    RUNTIME = 4  # the environment (CUDA, memory, disk, permissions), or an internal error
    INTERRUPTED = 128 + signal.SIGINT  # 130: SIGINT (Ctrl-C)
    TERMINATED = 128 + signal.SIGTERM  # 143: SIGTERM (CI cancellation, docker stop, timeout)


class Debug:
    """Whether an internal error shows its traceback: the --debug switch of this run, or S3LORA_DEBUG=1."""

    switch = False

    @classmethod
    def on(cls) -> bool:
        return cls.switch or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancellation, ``docker stop``, ``timeout``), raised where the program is, like Ctrl-C, so that
    every write path removes its temporary files on the way out."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
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


def fail(code: ExitCode, message: str) -> typer.Exit:
    """Print ``error: <message>`` and return the exit to raise."""
    print_error(message)
    return typer.Exit(code)


def error_boundary(command: C) -> C:
    """Map every exception to a documented exit code with a one-line message; never a traceback (but with
    --debug, for an internal error)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as exc:
            raise fail(*exit_for(exc)) from None

    return wrapper  # type: ignore[return-value]


def exit_for(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and the one-line message of an exception (SystemExit and the like are re-raised)."""
    if isinstance(exc, UsageError):
        return ExitCode.USAGE, str(exc)
    if isinstance(exc, AdapterInputError):
        return ExitCode.INPUT, str(exc)
    if isinstance(exc, (RuntimeProblem, S3LoraError)):
        return ExitCode.RUNTIME, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        code, name = (
            (ExitCode.TERMINATED, "SIGTERM") if isinstance(exc, Terminated) else (ExitCode.INTERRUPTED, "SIGINT")
        )
        said = str(exc) or (
            "interrupted; no output was left half-written (an output completed before the interruption is kept)"
        )
        return code, f"{said} ({name})"
    if isinstance(exc, MemoryError):
        return ExitCode.RUNTIME, "out of memory; try --device cpu, or a machine with more memory"
    if isinstance(exc, OSError):  # the environment (no space, read-only, permissions, a name too long), not a bug
        return ExitCode.RUNTIME, describe_os_error(exc)
    if not isinstance(exc, Exception):
        raise exc
    if Debug.on():  # a bug: never let it look like a failed gate
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return ExitCode.RUNTIME, f"internal error: {type(exc).__name__}: {first_line(exc)}. Please report it."
