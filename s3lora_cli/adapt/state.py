"""The Trigger Buffer's state directory: the state file (written atomically after every sample, so that a run
can stop anywhere and resume), the hand-off files derived from it, and the run that advances it line by line."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from s3lora_cli.adapt.buffer import Bucket, BufferState, Cluster, Sample, TriggerBuffer
from s3lora_cli.adapt.embedding import Embedder
from s3lora_cli.adapt.policy import BufferPolicy
from s3lora_cli.adapt.tasks import parse_triggered
from s3lora_cli.adapters.writer import write_text_atomic
from s3lora_cli.errors import AdapterInputError, UsageError

STATE_FILE = "state.json"
HANDOFF_DIR = "clusters"
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


@dataclass
class RunSummary:
    """What a run of the buffer did. lines: input lines read (in total, across resumes); triggered: triggered
    samples among them; bad: bad lines skipped in this run; handed_off: ids of the clusters handed off."""

    lines: int = 0
    triggered: int = 0
    bad: int = 0
    reclusterings: int = 0
    stabilisations: int = 0
    clusters: int = 0
    handed_off: tuple[int, ...] = ()
    buffered: int = 0


# --- serialisation --------------------------------------------------------------------------------------------


def _sample_json(s: Sample) -> dict[str, Any]:
    return {"line": s.line, "text": s.text, "record": s.record, "embedding": s.embedding.tolist()}


def _sample(d: dict[str, Any]) -> Sample:
    return Sample(
        line=int(d["line"]),
        text=str(d["text"]),
        record=dict(d["record"]),
        embedding=np.asarray(d["embedding"], dtype=np.float32),
    )


def _vector(v: Any) -> np.ndarray | None:
    return None if v is None else np.asarray(v, dtype=np.float64)


def state_json(state: BufferState, consumed: int, digest: str) -> str:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "consumed_lines": consumed,
        "consumed_sha256": digest,
        "embedder": state.embedder,
        "next_cluster_id": state.next_cluster_id,
        "reclusterings": state.reclusterings,
        "stabilisations": state.stabilisations,
        "buckets": {
            k: {
                "samples": [_sample_json(s) for s in b.samples],
                "previous": b.previous,
                "origin": None if b.origin is None else b.origin.tolist(),
            }
            for k, b in state.buckets.items()
        },
        "clusters": [
            {
                "id": c.id,
                "bucket": c.bucket,
                "members": [_sample_json(s) for s in c.members],
                "centre": c.centre.tolist(),
                "keywords": c.keywords,
                "handed_off": c.handed_off,
            }
            for c in state.clusters
        ],
    }
    return json.dumps(doc, allow_nan=False)


def load_state(directory: Path) -> tuple[BufferState, int, str]:
    """The state in ``directory`` with the number of input lines it has consumed and their sha256;
    AdapterInputError naming the file when it is missing or corrupt."""
    path = Path(directory) / STATE_FILE
    try:
        return parse_state(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise AdapterInputError(f"{path}: no buffer state to resume (run without --resume to start one)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterInputError(
            f"{path}: corrupt buffer state ({type(exc).__name__}: {exc}); it was left as it "
            "is: move it away, or start over with --force"
        ) from None


def parse_state(doc: dict[str, Any]) -> tuple[BufferState, int, str]:
    """The buffer state of a parsed ``state_json`` document, with its consumed lines and their sha256; raises
    ValueError, KeyError or TypeError when it is not one."""
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    state = BufferState(
        buckets={
            str(k): Bucket(
                samples=[_sample(s) for s in b["samples"]],
                previous=None if b["previous"] is None else [int(x) for x in b["previous"]],
                origin=_vector(b["origin"]),
            )
            for k, b in doc["buckets"].items()
        },
        clusters=[
            Cluster(
                id=int(c["id"]),
                bucket=str(c["bucket"]),
                members=[_sample(s) for s in c["members"]],
                centre=cast(np.ndarray, _vector(c["centre"])),
                keywords=[str(w) for w in c["keywords"]],
                handed_off=bool(c["handed_off"]),
            )
            for c in doc["clusters"]
        ],
        next_cluster_id=int(doc["next_cluster_id"]),
        reclusterings=int(doc["reclusterings"]),
        stabilisations=[
            {"line": int(s["line"]), "reclusterings": int(s["reclusterings"])} for s in doc["stabilisations"]
        ],
        embedder=str(doc["embedder"]),
    )
    return state, int(doc["consumed_lines"]), str(doc["consumed_sha256"])


def write_handoff(directory: Path, state: BufferState, ready: list[Cluster]) -> None:
    """Make ``directory``/clusters hold one JSONL file per ready cluster (its members' task records, in line
    order) and manifest.json (each cluster's file, size, keywords, centre and the origin its vectors are centred
    on); files of clusters merged away are removed. Each file is written atomically."""
    out = Path(directory) / HANDOFF_DIR
    out.mkdir(exist_ok=True)
    entries = []
    for c in ready:
        c.handed_off = True
        name = f"cluster-{c.id:04d}.jsonl"
        text = "".join(json.dumps(s.record, allow_nan=False) + "\n" for s in c.members)
        target = out / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            write_text_atomic(target, text)
        origin = state.buckets[c.bucket].origin
        entries.append(
            {
                "id": c.id,
                "file": name,
                "bucket": c.bucket,
                "size": len(c.members),
                "keywords": c.keywords,
                "centre": c.centre.tolist(),
                "origin": None if origin is None else origin.tolist(),
            }
        )
    keep = {e["file"] for e in entries} | {MANIFEST}
    for stale in out.glob("cluster-*.jsonl"):
        if stale.name not in keep:
            stale.unlink()
    manifest = {"schema_version": SCHEMA_VERSION, "embedder": state.embedder, "clusters": entries}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, allow_nan=False) + "\n")


# --- the run --------------------------------------------------------------------------------------------------


def prepare_state_directory(directory: Path, resume: bool, force: bool) -> None:
    """Refuse to start over an existing state or hand-off directory without --force, or to resume where there is
    no state."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; --state takes a directory")
    has_state = (directory / STATE_FILE).exists() or any((directory / HANDOFF_DIR).glob("*"))
    if resume:
        if not (directory / STATE_FILE).exists():
            raise AdapterInputError(f"{directory / STATE_FILE}: no buffer state to resume (run without --resume)")
        return
    if has_state and not force:
        raise UsageError(f"{directory} holds a buffer state; pass --resume to continue it or --force to start over")
    if has_state:
        (directory / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(directory / HANDOFF_DIR, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def run_buffer(
    lines: Iterable[str],
    directory: Path,
    policy: BufferPolicy,
    embed: Embedder,
    *,
    resume: bool = False,
    bucket_by_tag: bool = False,
    strict: bool = False,
    on_bad_line: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Feed the triggered samples of ``lines`` (the Trigger's JSONL output) through the Trigger Buffer whose
    state lives in ``directory``, saving the state after every triggered sample.

    With ``resume``, the lines the state has already consumed are checked (sha256) and skipped, so an
    interrupted run resumed gives the same clusters as one that was never interrupted. Each sample's text is
    its prompt and gold answer (never its tag or any other field); its bucket is its tag with
    ``bucket_by_tag``, else the single bucket "all"."""
    directory = Path(directory)
    if resume:
        state, consumed, digest = load_state(directory)
        if state.embedder != embed.name:
            raise UsageError(
                f"{directory / STATE_FILE} was built with {state.embedder}, not {embed.name}; "
                "resume with the same model or --embedder"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        state, consumed, digest = BufferState(embedder=embed.name), 0, hashlib.sha256().hexdigest()
    buffer = TriggerBuffer(state, policy)
    hasher = hashlib.sha256()
    summary = RunSummary()
    number = 0

    def save() -> None:
        write_text_atomic(directory / STATE_FILE, state_json(state, number, hasher.hexdigest()))
        write_handoff(directory, state, buffer.ready())

    for number, text in enumerate(lines, start=1):
        hasher.update(text.encode("utf-8"))
        if number <= consumed:
            if number == consumed and hasher.hexdigest() != digest:
                raise AdapterInputError(
                    f"the first {consumed} lines of the input are not those the state in "
                    f"{directory} has consumed; resume with the same input"
                )
            continue
        if progress is not None:
            progress(number)
        if not text.strip():
            continue
        try:
            task = parse_triggered(text, number)
        except AdapterInputError as exc:
            if strict:
                raise
            summary.bad += 1
            if on_bad_line is not None:
                on_bad_line(str(exc))
            continue
        if task is None:
            continue
        summary.triggered += 1
        sample_text = f"{task.prompt}\n{task.answer}"
        vector = np.asarray(embed([sample_text])[0], dtype=np.float32)
        sample = Sample(line=number, text=sample_text, record=task.record, embedding=vector)
        buffer.add(sample, (task.tag or "") if bucket_by_tag else "all")
        save()
    if number < consumed:
        raise AdapterInputError(
            f"the input has {number} lines but the state in {directory} has consumed "
            f"{consumed}; resume with the same input"
        )
    save()
    summary.lines = number
    summary.reclusterings = state.reclusterings
    summary.stabilisations = len(state.stabilisations)
    summary.clusters = len(state.clusters)
    summary.handed_off = tuple(c.id for c in buffer.ready())
    summary.buffered = sum(len(b.samples) for b in state.buckets.values())
    return summary
