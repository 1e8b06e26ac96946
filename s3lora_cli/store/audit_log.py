"""The audit log of a store: one JSON record per admission decision, appended whole and fsynced under the
store's lock, and read back oldest first."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s3lora_cli import durable
from s3lora_cli.errors import AdapterInputError, describe_os_error

AUDIT_LOG_NAME = ".s3lora-audit.jsonl"


class AppendedRecord:
    """One record appended to the audit log and fsynced, which can still be taken back (``undo``) until the
    admission it records is in place: the log holds whole lines only, and only of decisions that took effect.
    ``warning``: what the caller should show when the log's last line was incomplete."""

    def __init__(self, log: Path, record: Mapping[str, Any]) -> None:
        data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        self.warning: str | None = None
        self._fd: int | None = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._size = os.fstat(self._fd).st_size
            if self._size and os.pread(self._fd, 1, self._size - 1) != b"\n":
                self.warning = (
                    f"{log}: its last line is incomplete (a write was cut short); it is left as it is, "
                    "readers skip it, and the new record starts on a line of its own"
                )
                data = b"\n" + data
            try:
                durable.write_all(self._fd, data)
                os.fsync(self._fd)
            except BaseException:
                self.undo()
                raise
        except BaseException:
            self.close()
            raise

    def undo(self) -> None:
        """Cut the log back to what it was before this record (the store's lock keeps others from appending)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of an audit log, oldest first. A line that is not one whole JSON object (the torn last line
    of a write that was cut short) is skipped with a ``warnings.warn``."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as exc:
        raise AdapterInputError(f"{path}: cannot read the audit log ({describe_os_error(exc)})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(f"{path}: line {number} is not a whole record (a write cut short?); skipped", stacklevel=2)
            continue
        records.append(record)
    return records
