"""Atomic, durable writes to the file system: temporary files and directories beside their target, owned by the
running process (an fcntl lock plus its pid in the name) and renamed into place; the --force swap of a directory
(renameat2 RENAME_EXCHANGE where Linux has it, else two renames recovered by the next run); cleaning what killed
runs left; and holding SIGINT / SIGTERM back while a result is committed."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_KIND, OLD_KIND = "tmp", "old"
"""``.<base>.<pid>-<token>.s3lora-tmp``: a result being written; ``...s3lora-old``: a replaced directory on its
way out (only without RENAME_EXCHANGE)."""

_OWNED = re.compile(r"^\.(?P<base>.*)\.(?P<pid>\d+)-(?P<token>[0-9a-f]{8})\.s3lora-(?P<kind>tmp|old)$")
_BASE_CHARS = 200  # of the target's name in a temporary name, so that the temporary name fits NAME_MAX too
_HASHED = re.compile(r".*~[0-9a-f]{12}")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_COPY_BLOCK = 8 << 20

# file descriptors that hold the lock of each temporary path this process owns
_held: dict[str, int] = {}


# --- names and ownership ------------------------------------------------------------------------------------


def base_of(target_name: str) -> str:
    """The part of a temporary name that says which target it is for: the name itself, or for a long one its
    first characters and a hash of all of it."""
    if len(target_name) <= _BASE_CHARS:
        return target_name
    return f"{target_name[: _BASE_CHARS - 13]}~{hashlib.sha256(target_name.encode()).hexdigest()[:12]}"


def owned_name(target_name: str, kind: str = TEMP_KIND) -> str:
    return f".{base_of(target_name)}.{os.getpid()}-{secrets.token_hex(4)}.s3lora-{kind}"


def _lock_fd(path: Path) -> int | None:
    """An fd of ``path`` holding an exclusive flock, or None where the system or file system has no locks (the
    pid in the name then decides alone)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise
        return None
    return fd


def _own(path: Path) -> None:
    try:
        fd = _lock_fd(path)
    except OSError:
        return
    if fd is not None:
        _held[str(path)] = fd


def _release(path: Path) -> None:
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


def _abandoned(path: Path, pid: int) -> bool:
    """Whether the process that made ``path`` is gone: its pid is not running here and nobody holds its lock
    (a process on another machine sharing the file system holds the lock; one here has a live pid)."""
    if str(path) in _held or _pid_alive(pid):
        return False
    try:
        fd = _lock_fd(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EACCES)
    if fd is not None:
        os.close(fd)
    return True


def clean_stale(directory: Path, target_name: str | None = None) -> list[Path]:
    """Remove what killed runs left in ``directory`` (for ``target_name`` only, when given): their temporary files
    and directories, and the replaced directory of a --force swap that was cut short, which is first renamed
    back into place when its target is missing (so a swap killed half-way leaves the old output, not none).
    Entries of live processes, here or on another machine, are left alone. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return removed
    for entry in entries:
        m = _OWNED.match(entry.name)
        if m is None or (target_name is not None and m["base"] != base_of(target_name)):
            continue
        path = Path(entry.path)
        if not _abandoned(path, int(m["pid"])):
            continue
        if m["kind"] == OLD_KIND:
            if len(m["base"]) == _BASE_CHARS and _HASHED.fullmatch(m["base"]):
                continue  # a name too long to recover from its hash: left for the user, never removed
            if _restore(path, directory, m["base"]):
                continue
        try:
            _remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _restore(old: Path, directory: Path, base: str) -> bool:
    """Rename a replaced directory back to its target when the target is missing (a half-done swap)."""
    target = directory / base
    if os.path.lexists(target):
        return False
    try:
        os.rename(old, target)
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- renames --------------------------------------------------------------------------------------------------


def _renameat2(old: Path, new: Path, flags: int) -> bool:
    """Linux renameat2(2); False where it is not available (another OS, an old kernel or libc, a file system
    without the flag), so that the caller falls back. Other errors raise OSError."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(old), None, str(new))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (also when it appears at the
    same moment, where RENAME_NOREPLACE exists)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- files ----------------------------------------------------------------------------------------------------


def write_file_atomic(
    target: Path, write: Callable[[BinaryIO], object], *, replace: bool = True, mode: int | None = None
) -> None:
    """Write a file through ``write(fh)`` into a temporary file beside ``target``, fsync it, and rename it into
    place: a reader sees the old file or the whole new one. ``replace`` False refuses (FileExistsError) a
    target that exists at the moment of the rename. What killed runs left in the same directory is removed
    first (``clean_stale``). ``mode``: the new file's permission bits (default: 0o666 less the umask)."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    clean_stale(parent)
    tmp = parent / owned_name(target.name)
    with deferred_signals():  # no interruption between making the file and the try that removes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        _own(tmp)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, target)
        else:
            rename_noreplace(tmp, target)
        _release(tmp)
        _fsync_dir(parent)
    except BaseException:
        _release(tmp)
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``write_file_atomic`` of UTF-8 text."""
    write_file_atomic(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a short write (a signal, a nearly full disk) is continued, and a
    write that cannot continue raises OSError."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def copy_exact(src_fh: BinaryIO, dst_fh: BinaryIO, size: int, where: str) -> None:
    """Copy exactly ``size`` bytes; a file that ends sooner or goes on is one that changed while it was copied."""
    left = size
    while left:
        block = src_fh.read(min(left, _COPY_BLOCK))
        if not block:
            raise _changed(where)
        dst_fh.write(block)
        left -= len(block)
    if src_fh.read(1):
        raise _changed(where)


def _changed(where: str) -> Exception:
    from s3lora_cli.errors import AdapterInputError

    return AdapterInputError(f"{where} changed size while it was copied; nothing was written, run again")


# --- directories ----------------------------------------------------------------------------------------------


def make_temp_dir(parent: Path, target_name: str) -> Path:
    """A new, empty temporary directory in ``parent`` for ``target_name``, owned (locked) by this process until
    ``install_dir`` or ``discard``; what killed runs left in ``parent`` is removed first (``clean_stale``)."""
    clean_stale(parent)
    tmp = parent / owned_name(target_name)
    os.mkdir(tmp)
    _own(tmp)
    return tmp


def discard(tmp: Path | None) -> None:
    """Remove a temporary file or directory this process made (nothing if it is gone; what cannot be removed
    now is left for ``clean_stale``)."""
    if tmp is None:
        return
    _release(tmp)
    try:
        _remove(tmp)
    except OSError:
        pass


def install_dir(tmp: Path, destination: Path, *, replace: bool) -> Path | None:
    """Rename the finished directory ``tmp`` to ``destination``; returns the replaced directory, now under a
    temporary name, for the caller to ``discard`` (None when nothing was replaced). Without ``replace`` an
    existing destination is refused (FileExistsError). With it, the two are exchanged atomically (renameat2
    RENAME_EXCHANGE); where that is not available, the old one is renamed aside (a locked ``.s3lora-old`` name)
    and the new one into place, and a run killed between the two renames has its old one restored by the next
    run that writes there (``clean_stale``). At every moment ``destination`` is the old directory or the new
    one. Call it inside ``deferred_signals`` to learn for sure whether it happened."""
    parent = destination.absolute().parent
    if not replace or not os.path.lexists(destination):
        rename_noreplace(tmp, destination)
        _release(tmp)
        _fsync_dir(parent)
        return None
    if _renameat2(tmp, destination, _RENAME_EXCHANGE):
        _fsync_dir(parent)
        return tmp  # now the old directory, still owned by this process
    old = parent / owned_name(destination.name, OLD_KIND)
    with deferred_signals():
        fd = _lock_fd(destination) if destination.is_dir() and not destination.is_symlink() else None
        try:
            os.rename(destination, old)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            _held[str(old)] = fd
        try:
            os.rename(tmp, destination)
        except BaseException:
            os.rename(old, destination)
            _release(old)
            raise
        _release(tmp)
    _fsync_dir(parent)
    return old


# --- signals --------------------------------------------------------------------------------------------------

_DEFERRED = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a result is committed (a few renames and one log line), so that an
    interruption lands before the commit or after it, never inside. They are delivered when the block ends.

    The signals are held by Python-level handlers that only note them, not by blocking them in this thread: the
    kernel may deliver a process-directed signal to any thread that does not block it (PyTorch's, numba's), and
    Python then runs its handler in the main thread at once. Only the main thread can set handlers; elsewhere
    the block holds nothing back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in _DEFERRED:
        if signal.getsignal(signum) is None:  # a handler not set from Python: it could not be put back
            continue
        previous[signum] = signal.signal(signum, lambda received, frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for received in dict.fromkeys(pending):  # each once, in the order received
            signal.raise_signal(received)


@contextmanager
def lock_file(path: Path, timeout: float, busy: str) -> Iterator[None]:
    """Hold the lock file ``path`` (``filelock``: fcntl on POSIX, msvcrt on Windows) for the block. When another
    process holds it for ``timeout`` seconds (0: at once), RuntimeProblem with the one-line ``busy``."""
    from filelock import FileLock, Timeout

    from s3lora_cli.errors import RuntimeProblem

    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeProblem(busy) from None
    try:
        yield
    finally:
        lock.release()
