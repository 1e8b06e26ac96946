"""Which files of an adapter directory are copied with it (by ``prune`` and ``admit``): regular files inside it,
found without following symlinked directories, in bounded number and total size; and copying them exactly."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from s3lora_cli.adapters.detect import check_confined
from s3lora_cli.adapters.safetensors_io import open_regular
from s3lora_cli.durable import copy_exact
from s3lora_cli.errors import AdapterInputError

MAX_OTHER_FILES = 10_000
MAX_OTHER_BYTES = 1 << 30
"""Bounds on the files copied beside an adapter's weights and config (README, tokenizer, training arguments):
at most MAX_OTHER_FILES files and MAX_OTHER_BYTES bytes in all."""
MAX_DEPTH = 32
TEMP_SUFFIXES = (".s3lora-tmp", ".s3lora-old")
NOT_COPIED = frozenset({".git", ".hg", ".svn", ".cache"})
"""Top-level folders that are not part of an adapter (version control, the Hub's download metadata)."""


@dataclass(frozen=True)
class PlannedFile:
    """One file to copy: its path in the source, its path relative to the adapter directory, and its size when
    it was planned (the copy takes exactly that many bytes, or fails)."""

    source: Path
    relative: str
    size: int


def plan_copy(
    source_dir: Path, skip: Iterable[str] = (), counted: bool = True, exempt: Iterable[str] = ()
) -> list[PlannedFile]:
    """The files of ``source_dir`` to copy, sorted by relative path, leaving out the top-level names in ``skip``
    and NOT_COPIED, and s3lora's own temporary names. Regular files and symlinks to regular files inside the
    directory (or, in a Hugging Face cache snapshot, into its blobs) are taken; a symlink leading outside, a
    symlink to a directory (a loop or a second copy of a tree), a named pipe, socket or device is refused with
    AdapterInputError naming it. With ``counted``, the files not named in ``exempt`` (top-level names) are
    bounded by MAX_OTHER_FILES and MAX_OTHER_BYTES."""
    skip, exempt = set(skip), set(exempt)
    planned: list[PlannedFile] = []
    count = total = 0

    def visit(directory: Path, prefix: str, depth: int) -> None:
        nonlocal count, total
        if depth > MAX_DEPTH:
            raise AdapterInputError(
                f"{directory}: folders nested more than {MAX_DEPTH} deep in the adapter directory; refused"
            )
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise AdapterInputError(f"{directory}: cannot be listed ({exc.strerror})") from None
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            top_skipped = not prefix and (entry.name in skip or entry.name in NOT_COPIED)
            if top_skipped or entry.name.endswith(TEMP_SUFFIXES):
                continue
            path = Path(entry.path)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                check_confined(path, source_dir)
                try:
                    info = os.stat(path)
                except OSError:
                    raise AdapterInputError(f"{path} is a broken symlink; refused: remove it or fix it") from None
                if stat.S_ISDIR(info.st_mode):
                    raise AdapterInputError(
                        f"{path} is a symlink to a directory; refused (it could loop or copy a "
                        "tree twice): replace it with the directory itself, or remove it"
                    )
            if stat.S_ISDIR(info.st_mode):
                visit(path, f"{rel}/", depth + 1)
            elif stat.S_ISREG(info.st_mode):
                planned.append(PlannedFile(path, rel, info.st_size))
                if counted and not (not prefix and entry.name in exempt):
                    count += 1
                    total += info.st_size
            else:
                raise AdapterInputError(
                    f"{path} is not a regular file (a named pipe, socket or device); refused: "
                    "an adapter directory holds only files and folders"
                )
        if count > MAX_OTHER_FILES or total > MAX_OTHER_BYTES:
            raise AdapterInputError(
                f"{source_dir}: the files beside the adapter's weights and config number {count} and total "
                f"{total} bytes, over the limit of {MAX_OTHER_FILES} files and {MAX_OTHER_BYTES >> 20} MiB that "
                "s3lora copies with an adapter; move what is not part of the adapter out of its directory"
            )

    check_confined(source_dir, source_dir)
    visit(source_dir, "", 0)
    return planned


def copy_planned(planned: Iterable[PlannedFile], target: Path) -> None:
    """Copy each planned file into ``target`` (folders created as needed): exactly the planned number of bytes,
    opened as a regular file without blocking, with its permission bits and times."""
    for item in planned:
        dst = target / item.relative
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_file(item.source, dst, item.size)


def copy_file(src: Path, dst: Path, size: int) -> None:
    """Copy one regular file of ``size`` bytes (a file that is no longer regular, or changed size, is refused)."""
    with open_regular(src) as fin, open(dst, "xb") as fout:
        copy_exact(fin, fout, size, str(src))
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)
