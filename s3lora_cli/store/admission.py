"""Admitting an adapter into a store: the gate run on it, the copy into the store (or its quarantine) under its
content key, and the decision appended to the audit log, under the store's lock, so that an entry is in place
only with its record. Returns data; never prints."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from s3lora_cli import durable
from s3lora_cli._version import __version__
from s3lora_cli.adapters import open_adapter
from s3lora_cli.adapters.base import file_sha256
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.adapters.detect import check_confined
from s3lora_cli.adapters.files import PlannedFile, copy_planned, plan_copy
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError, describe_os_error, one_line
from s3lora_cli.gate import GatePolicy, GateResult, check_adapters
from s3lora_cli.store.audit_log import AUDIT_LOG_NAME, AppendedRecord
from s3lora_cli.store.discovery import discover, inside, relative
from s3lora_cli.store.neighbours import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_NEIGHBOURS,
    factor_size,
    nearest_neighbours,
)
from s3lora_cli.store.results import Neighbour

LOCK_NAME = ".s3lora.lock"
QUARANTINE_SUFFIX = ".quarantine"
ADMIT_RECORD_NAME = "s3lora-admit.json"
REPORT_NAME = "s3lora-report.json"
DEFAULT_LOCK_TIMEOUT = 600.0


@dataclass(frozen=True)
class AdmitResult:
    """What ``admit`` did with one adapter.

    gate: the gate's verdict. admitted: it passed and is in the store. name: its entry's directory name,
    ``<name>-<key[:12]>``. sha256: of its weights file. key: its content key (``entry_key``: the weights and the
    config). destination: its directory in the store (admitted) or in the quarantine (refused). already_present:
    an entry with the same key was already there (under this name or another), so nothing was copied.
    neighbours: its nearest adapters in the store. record: the line appended to the audit log. broken: members
    of the store that could not be read (left out of the neighbours). warnings: what the caller should show
    (a torn last line of the audit log, broken members).
    """

    gate: GateResult
    admitted: bool
    name: str
    sha256: str
    destination: Path
    already_present: bool
    neighbours: tuple[Neighbour, ...]
    audit_log: Path
    record: dict[str, Any]
    key: str = ""
    broken: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Candidate:
    """The adapter being admitted, gated: its weights and config files and its content key."""

    path: Path
    gate: GateResult
    weights: Path
    config: Path | None
    key: str
    refusal: str | None = None
    """A reason to refuse found outside the gate (such as an evaluation below a floor), or None."""

    @property
    def passed(self) -> bool:
        return self.gate.passed and self.refusal is None


def quarantine_dir(store: Path) -> Path:
    """``<store>.quarantine``, beside the store."""
    store = Path(store)
    if store.name in ("", ".", ".."):
        store = store.resolve()
    return store.parent / f"{store.name}{QUARANTINE_SUFFIX}"


def entry_key(weights_sha256: str, config_sha256: str | None) -> str:
    """An entry's content key: the hex sha256 of its weights file's sha256 and its config file's sha256 (or of
    no config), so that the same weights with another lora_alpha, rank_pattern, ... are another entry."""
    doc = {"weights": weights_sha256, "config": config_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def clean_stale(directory: Path) -> list[Path]:
    """Remove the temporary directories killed admits left in ``directory`` (those of live processes, here or on
    another machine, stay). Returns what was removed."""
    return durable.clean_stale(Path(directory))


def admit_adapter(
    candidate: str | Path,
    store: str | Path,
    policy: GatePolicy,
    *,
    device: str = "auto",
    name: str | None = None,
    quarantine: str | Path | None = None,
    audit_log: str | Path | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    report_json: Callable[[GateResult], str] | None = None,
    clock: Callable[[], datetime] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    refusal: str | None = None,
) -> AdmitResult:
    """Run the gate on ``candidate``; copy it into ``store`` as ``<name>-<key[:12]>/`` when it passes, or into
    the quarantine (default ``<store>.quarantine/``) with its report when it fails; append the decision to the
    audit log (default ``<store>/.s3lora-audit.jsonl``).

    The copy is made in a temporary directory inside the destination. Under a lock on the store
    (``<store>/.s3lora.lock``), which also serialises the audit log, the record is appended and fsynced, then the
    copy renamed into place; if the rename fails the record is cut off again, and if the record cannot be
    written nothing is renamed: an entry is in place only with its record (SIGINT and SIGTERM wait until both
    are done). ``report_json(gate)``, when given, is written beside a quarantined adapter as s3lora-report.json.
    ``refusal``, when given, quarantines the adapter whatever the gate says, with that reason first in the record
    (a check made outside the gate, such as an evaluation below a floor)."""
    candidate, store = Path(candidate), Path(store)
    quarantine, audit = _check_arguments(candidate, store, name, neighbours, quarantine, audit_log)
    gated = replace(_gated(candidate, policy, device), refusal=refusal)
    home = candidate if candidate.is_dir() else candidate.parent
    entry_name = f"{name or home.resolve().name or 'adapter'}-{gated.key[:12]}"
    store.mkdir(parents=True, exist_ok=True)
    near, broken, notes = _neighbours_in(store, candidate, neighbours, duplicate_threshold)
    into = store if gated.passed else quarantine
    into.mkdir(parents=True, exist_ok=True)
    now = (clock or (lambda: datetime.now(timezone.utc)))()
    record = _record(gated, entry_name, into / entry_name, near, now)
    extra = {}
    if not gated.passed:
        extra[ADMIT_RECORD_NAME] = json.dumps(record, allow_nan=False, indent=2) + "\n"
        if report_json is not None:
            extra[REPORT_NAME] = report_json(gated.gate)
    replaced = sorted(name for name in extra if candidate.is_dir() and os.path.lexists(candidate / name))
    notes.extend(f"the adapter's own {name} is replaced in {into} by this decision's" for name in replaced)
    with _locked(store, lock_timeout):
        destination, warning = _commit(gated, store, into, into / entry_name, audit, record, extra)
    if warning:
        notes.insert(0, warning)
    return AdmitResult(
        gated.gate,
        gated.passed,
        record["name"],
        gated.gate.report.adapter.sha256,
        destination,
        record["already_present"],
        near,
        audit,
        record,
        gated.key,
        tuple(broken),
        tuple(notes),
    )


def _check_arguments(
    candidate: Path,
    store: Path,
    name: str | None,
    neighbours: int,
    quarantine: str | Path | None,
    audit_log: str | Path | None,
) -> tuple[Path, Path]:
    """Refuse what cannot work, before any work; the quarantine and the audit log, defaults applied."""
    if store.exists() and not store.is_dir():
        raise UsageError(f"--store {store} is not a directory")
    if not candidate.exists():
        raise AdapterInputError(f"{candidate}: no such file or directory")
    if inside(candidate, store) or inside(store, candidate):
        raise UsageError(f"{candidate} and the store {store} overlap; admit an adapter from outside the store")
    if name is not None and (not name or name.startswith(".") or "/" in name or "\\" in name):
        raise UsageError(f"--name {name!r}: expected a plain directory name, not starting with '.'")
    if neighbours < 0:
        raise UsageError(f"--neighbours must be at least 0, got {neighbours}")
    quarantine = Path(quarantine) if quarantine is not None else quarantine_dir(store)
    audit = Path(audit_log) if audit_log is not None else store / AUDIT_LOG_NAME
    home = candidate if candidate.is_dir() else candidate.parent
    for option, path in (("--quarantine", quarantine), ("--audit-log", audit)):
        if inside(path, home) or (candidate.is_dir() and inside(candidate, path)):
            raise UsageError(
                f"{option} {path} overlaps the adapter {candidate}; nothing is ever written into an "
                "input: choose a path outside it"
            )
    return quarantine, audit


def _gated(candidate: Path, policy: GatePolicy, device: str) -> _Candidate:
    """The gate's verdict on ``candidate`` and its content key; refused if its config changed meanwhile."""
    before = _config_sha256(_config_file(candidate, candidate))
    gate = check_adapters([candidate], policy, device)[0]
    weights = Path(gate.report.adapter.weights_file)
    config = _config_file(candidate, weights)
    config_sha = _config_sha256(config)
    if config_sha != before:
        raise AdapterInputError(f"{config} changed while it was being admitted; run admit again")
    return _Candidate(candidate, gate, weights, config, entry_key(gate.report.adapter.sha256, config_sha))


def _neighbours_in(
    store: Path, candidate: Path, k: int, threshold: float
) -> tuple[tuple[Neighbour, ...], list[str], list[str]]:
    """The candidate's nearest neighbours among the store's readable members, the members that cannot be read,
    and the notes for the caller (those members; neighbours that could not be computed)."""
    members, broken = _readable_members(store)
    notes = [f"{store}/{b}; left out of the neighbours" for b in broken]
    try:
        near = nearest_neighbours([candidate], members, store, k, threshold)[candidate]
    except S3LoraError as exc:
        near = ()
        notes.append(f"the store's neighbours could not be computed ({one_line(exc)})")
    return near, broken, notes


def _record(
    gated: _Candidate, entry_name: str, destination: Path, near: tuple[Neighbour, ...], now: datetime
) -> dict[str, Any]:
    """The audit record of the decision (``already_present``, ``name`` and ``destination`` updated when an entry
    with the same content is found under the lock)."""
    gate = gated.gate
    return {
        "time": now.isoformat(),
        "adapter": str(gated.path.resolve()),
        "name": entry_name,
        "sha256": gate.report.adapter.sha256,
        "key": gated.key,
        "verdict": "admitted" if gated.passed else "refused",
        "already_present": False,
        "destination": str(destination.resolve()),
        "reasons": [gated.refusal] * (gated.refusal is not None) + [f"{v.module}: {v.message}" for v in gate.failing],
        "rules": [
            {
                "rule": o.rule.value,
                "limit": o.limit,
                "allowed": o.allowed,
                "violations": o.violations,
                "passed": o.passed,
            }
            for o in gate.rules
        ],
        "duplicates": [{"path": n.path, "cosine": round(n.cosine, 6)} for n in near if n.duplicate],
        "tool_version": __version__,
    }


def _commit(
    gated: _Candidate,
    store: Path,
    into: Path,
    destination: Path,
    audit: Path,
    record: dict[str, Any],
    extra: Mapping[str, str],
) -> tuple[Path, str | None]:
    """Under the store's lock: the copy made (unless the same content is there), the record appended, the copy
    renamed into place; the record taken back if the rename fails. Returns the entry and the log's warning."""
    for directory in {store, into}:
        clean_stale(directory)
    present = _find_entry(into, gated.key)
    if present is None and os.path.lexists(destination):
        raise UsageError(f"{destination} exists with other content; remove it or pass --name")
    tmp = None
    committed = False
    try:
        if present is not None:
            destination = present
            record.update(already_present=True, name=present.name, destination=str(present.resolve()))
        else:
            tmp = _copy_adapter(gated, into, destination.name, extra)
        audit.parent.mkdir(parents=True, exist_ok=True)
        with durable.deferred_signals():
            appended = AppendedRecord(audit, record)
            try:
                if tmp is not None:
                    durable.install_dir(tmp, destination, replace=False)
                    tmp = None
            except BaseException:
                appended.undo()
                raise
            finally:
                appended.close()
            committed = True  # inside the block: a signal held back is delivered after this, never before
    except BaseException as exc:
        durable.discard(tmp)
        _explain(exc, committed, gated, destination)
        raise
    return destination, appended.warning


def _explain(exc: BaseException, committed: bool, gated: _Candidate, destination: Path) -> None:
    """Raise, for an interruption after the commit or an error of the environment, the exception that says what
    was done; return (the caller re-raises ``exc``) otherwise."""
    passed = gated.passed
    if committed and isinstance(exc, KeyboardInterrupt):
        done = "admitted into" if passed else "quarantined in"
        raise type(exc)(f"interrupted after {gated.path} was {done} {destination} and logged") from None
    if isinstance(exc, OSError):
        done = "admitted" if passed else "quarantined"
        raise RuntimeProblem(
            f"cannot write the decision: {describe_os_error(exc)}; {gated.path} was not {done}, nothing was written"
        ) from None


def _config_file(adapter: Path, weights: Path) -> Path | None:
    config = (adapter if adapter.is_dir() else weights.parent) / CONFIG_NAME
    return config if config.is_file() else None


def _config_sha256(config: Path | None) -> str | None:
    if config is None:
        return None
    try:
        return file_sha256(config)
    except OSError as exc:
        raise AdapterInputError(f"{config}: cannot be read ({describe_os_error(exc)})") from None


def _member_key(member: Path) -> str:
    """The content key of an entry already in the store (or quarantine)."""
    with closing(open_adapter(member)) as adapter:
        weights = Path(adapter.weights_path)
        return entry_key(adapter.sha256(), _config_sha256(_config_file(member, weights)))


def _find_entry(into: Path, key: str) -> Path | None:
    """The entry of ``into`` with content ``key``, under any name; None when there is none. An entry that cannot
    be read is not a match."""
    if not into.is_dir():
        return None
    for candidate in sorted(into.glob(f"*-{key[:12]}")):
        if candidate.name.startswith(".") or not candidate.is_dir():
            continue
        try:
            if _member_key(candidate) == key:
                return candidate
        except (S3LoraError, OSError):
            continue
    return None


def _copy_adapter(gated: _Candidate, into: Path, entry: str, extra_files: Mapping[str, str]) -> Path:
    """Copy the adapter into a fresh temporary directory inside ``into`` (only regular files inside the adapter
    directory, ``files.plan_copy``), check that the copy has the content key the gate scored, add
    ``extra_files`` (in place of the adapter's own files of those names), and return the temporary directory
    (renamed into place by the caller)."""
    candidate, weights, config = gated.path, gated.weights, gated.config
    if candidate.is_dir():
        rel_weights = weights.resolve().relative_to(candidate.resolve()).as_posix()
        planned = plan_copy(candidate, exempt={rel_weights.split("/")[0], CONFIG_NAME})
        # a record of an earlier decision, or prune's report, under a name this decision writes: this one's wins
        planned = [f for f in planned if f.relative not in extra_files]
    else:
        planned = [PlannedFile(p, p.name, os.stat(p).st_size) for p in (weights, config) if p is not None]
        check_confined(weights, weights.parent)
        rel_weights = weights.name
    tmp = None
    try:
        with durable.deferred_signals():  # no interruption between making it and knowing it
            tmp = durable.make_temp_dir(into, entry)
        copy_planned(planned, tmp)
        copied_config = tmp / CONFIG_NAME if config is not None else None
        if entry_key(file_sha256(tmp / rel_weights), _config_sha256(copied_config)) != gated.key:
            raise AdapterInputError(f"{weights} or its config changed while it was being admitted; run admit again")
        for name, text in extra_files.items():
            with open(tmp / name, "x", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        return tmp
    except BaseException:
        durable.discard(tmp)
        raise


def _locked(store: Path, timeout: float) -> AbstractContextManager[None]:
    """Hold the store's lock file."""
    return durable.lock_file(
        store / LOCK_NAME, timeout, f"the store {store} stayed locked by another admit for {timeout:g} s; try again"
    )


def _readable_members(store: Path) -> tuple[list[Path], list[str]]:
    """The store's adapters that can be opened, and a one-line reason for each one that cannot."""
    good, broken = [], []
    for member in discover(store):
        try:
            factor_size(member)
        except (S3LoraError, OSError) as exc:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else one_line(exc)
            broken.append(f"{relative(member, store)}: {reason}")
            continue
        good.append(member)
    return good, broken
