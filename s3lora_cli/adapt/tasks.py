"""Reading a task stream: JSON lines ``{"prompt": ..., "answer": ..., "tag": optional}``, one line at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from s3lora_cli.errors import AdapterInputError


@dataclass(frozen=True)
class Task:
    """One sample of the stream. line: its 1-based line number; record: the whole JSON object, kept verbatim
    (fields other than prompt, answer and tag are carried through and never read)."""

    line: int
    prompt: str
    answer: str
    tag: str | None
    record: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    """A line that is not a task: its number and what is wrong with it."""

    line: int
    message: str


def parse_task(text: str, line: int) -> Task:
    """The task on one line of the stream; AdapterInputError (naming the line) when it is not one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterInputError(f"line {line}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise AdapterInputError(f"line {line}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise AdapterInputError(f"line {line}: '{key}' must be a non-empty string")
    tag = record.get("tag")
    if tag is not None and not isinstance(tag, str):
        raise AdapterInputError(f"line {line}: 'tag' must be a string when given")
    return Task(line=line, prompt=record["prompt"], answer=record["answer"], tag=tag, record=record)


def read_tasks(lines: Iterable[str], strict: bool = False, first_line: int = 1) -> Iterator[Task | BadLine]:
    """Yield a Task for each line of ``lines`` (blank lines skipped), or a BadLine for one that is not a task;
    with ``strict`` a bad line raises AdapterInputError instead. Reads lazily: one line at a time."""
    for number, text in enumerate(lines, start=first_line):
        if not text.strip():
            continue
        try:
            yield parse_task(text, number)
        except AdapterInputError as exc:
            if strict:
                raise
            yield BadLine(line=number, message=str(exc))


def parse_triggered(text: str, line: int) -> Task | None:
    """The task of one line of the Trigger's output when it triggered, None when it did not; AdapterInputError
    (naming the line) when the line is not a Trigger record."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterInputError(f"line {line}: not JSON ({exc.msg})") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("triggered"), bool)
        or not isinstance(record.get("task"), dict)
    ):
        raise AdapterInputError(f"line {line}: not a record of 's3lora adapt trigger' (needs 'task' and 'triggered')")
    if not record["triggered"]:
        return None
    return parse_task(json.dumps(record["task"]), line)
