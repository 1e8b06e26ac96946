"""The exceptions s3lora raises: one base, S3LoraError, and one subclass per kind of problem."""

from __future__ import annotations


class S3LoraError(Exception):
    """Base of every error s3lora raises on purpose; the message says what happened and what to do."""


class UsageError(S3LoraError):
    """The options given cannot work together (for example an output that exists without --force)."""


class AdapterInputError(S3LoraError):
    """The adapter cannot be read: a missing path, a malformed config, a corrupt or inconsistent file."""


class RuntimeProblem(S3LoraError):
    """The environment cannot run the computation (for example CUDA asked for but not available)."""


_OS_HINTS = {
    "ENOSPC": "free some space or write elsewhere",
    "EDQUOT": "free some space or write elsewhere",
    "EROFS": "the file system is read-only; write elsewhere",
    "EACCES": "check the permissions, or write elsewhere",
    "EPERM": "check the permissions, or write elsewhere",
    "ENAMETOOLONG": "choose a shorter name",
    "EMFILE": "too many open files; raise the limit (ulimit -n)",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an error of the operating system: the path it concerns, the reason, and what to do
    (``/st/x: No space left on device; free some space or write elsewhere``); never a Python repr."""
    import errno

    reason = exc.strerror or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths)
    hint = _OS_HINTS.get(errno.errorcode.get(exc.errno or 0, ""))
    return f"{where + ': ' if where else ''}{reason}{'; ' + hint if hint else ''}"


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message (``default`` when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else default


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none, for one-line errors."""
    return first_line(exc, type(exc).__name__)
