"""The self-adaptation loop: samples stream in, each is routed (to a stored adapter or the base model) and
answered, the Trigger judges the answer, failing samples go to the Trigger Buffer, and every cluster it hands
off is trained, gated and admitted to the LoRA store; the state directory lets a stopped run resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3lora_cli import durable
from s3lora_cli.adapt.admission import CLUSTER_RECORD_NAME, GateSettings, cluster_record, gate_adapter
from s3lora_cli.adapt.buffer import BufferState, Cluster, Sample, TriggerBuffer, unit
from s3lora_cli.adapt.embedding import Embedder
from s3lora_cli.adapt.policy import BufferPolicy, StorePolicy, TriggerPolicy
from s3lora_cli.adapt.routing import DEFAULT_ROUTE_THRESHOLD, Router
from s3lora_cli.adapt.state import HANDOFF_DIR, parse_state, state_json, write_handoff
from s3lora_cli.adapt.tasks import Task, parse_task
from s3lora_cli.adapt.train import TrainSettings, examples_of, train_cluster
from s3lora_cli.adapt.trigger import Band, failure_score, measure_signals, similarity_band
from s3lora_cli.adapters.writer import write_text_atomic
from s3lora_cli.errors import AdapterInputError, UsageError
from s3lora_cli.store import ADMIT_RECORD_NAME, quarantine_dir

LOOP_FILE = "loop.json"
LOCK_NAME = ".s3lora-loop.lock"
"""Held by a run or a refresh for as long as it uses the state directory."""
WORK_DIR = "work"
TRAINED_DIR = "trained"
LOOP_VERSION = 1
STAGES = ("route", "trigger", "buffer", "train", "gate")
BASE_SAMPLES = 512
"""The prompts the base model answered whose vectors the state keeps (the first ones) for the base centre."""


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop needs besides its inputs: the Trigger's and the buffer's policies, training, the gate,
    the route threshold, and how answers are generated."""

    trigger: TriggerPolicy = field(default_factory=TriggerPolicy)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    train: TrainSettings = field(default_factory=TrainSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    route_threshold: float = DEFAULT_ROUTE_THRESHOLD
    min_new: int = StorePolicy.min_new
    batch_size: int = 8
    max_new_tokens: int = 24
    bucket_by_tag: bool = False


@dataclass
class ClusterOutcome:
    """One training of a handed-off cluster (its ``generation``) and what became of it: the samples trained on
    (``members``), the store entry (or quarantine entry) of its adapter."""

    cluster: int
    members: int
    keywords: list[str]
    verdict: str
    entry: str
    destination: str
    validation_before: float
    validation_after: float
    pruned_layers: int
    scored_layers: int
    reasons: list[str]
    candidates: int
    generation: int = 1
    distinct: int | None = None
    """The distinct (prompt, answer) pairs among the ``members`` samples trained on."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoopProgress:
    """The loop's counters (across resumes): what the live summary shows and the final report holds."""

    samples: int = 0
    bad_lines: int = 0
    triggered: int = 0
    routed: int = 0
    routed_triggered: int = 0
    adapters_trained: int = 0
    candidates_trained: int = 0
    pruned_layers: int = 0
    admitted: int = 0
    quarantined: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    clusters: list[ClusterOutcome] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if k != "clusters"}
        doc["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        doc["clusters"] = [c.to_json() for c in self.clusters]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LoopProgress:
        clusters = [ClusterOutcome(**c) for c in doc.get("clusters", [])]
        plain = {k: v for k, v in doc.items() if k != "clusters"}
        return cls(**plain, clusters=clusters)


@dataclass(frozen=True)
class LoopReport:
    """The run's result: its counters, the number of clusters the buffer holds, the lines read, the wall time of
    this invocation, and where the state and the store are."""

    progress: LoopProgress
    clusters: int
    buffered: int
    lines: int
    run: str
    seconds: float
    store: Path
    state: Path

    def to_json(self) -> dict[str, Any]:
        p = self.progress.to_json()
        return {
            "run": self.run,
            "lines": self.lines,
            "samples": p["samples"],
            "bad_lines": p["bad_lines"],
            "triggered": p["triggered"],
            "routed": p["routed"],
            "routed_triggered": p["routed_triggered"],
            "clusters": self.clusters,
            "buffered": self.buffered,
            "adapters_trained": p["adapters_trained"],
            "candidates_trained": p["candidates_trained"],
            "pruned_layers": p["pruned_layers"],
            "admitted": p["admitted"],
            "quarantined": p["quarantined"],
            "stage_seconds": p["seconds"],
            "seconds": round(self.seconds, 3),
            "store": str(self.store),
            "state": str(self.state),
            "adapters": p["clusters"],
        }


Event = Callable[[str, LoopProgress], None]
"""on_event(message, progress): called after every batch and at every stage of a cluster."""


# --- the state directory --------------------------------------------------------------------------------------


def state_locked(directory: Path) -> AbstractContextManager[None]:
    """Hold ``directory``'s lock for a ``with`` block: a second run or refresh of the same state is refused at once
    (RuntimeProblem, exit 4) rather than interleaving its writes with this one's. The directory is created if
    missing."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; --state takes a directory")
    directory.mkdir(parents=True, exist_ok=True)
    busy = f"{directory} is in use by another 'adapt run' or 'adapt refresh'; wait for it to end"
    return durable.lock_file(directory / LOCK_NAME, 0, busy)


def prepare_loop_state(directory: Path, resume: bool, force: bool) -> None:
    """Refuse to start over an existing loop state without --force, or to resume where there is none; with
    --force the old state goes (the store is never touched)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; --state takes a directory")
    has_state = directory.is_dir() and any(p.name != LOCK_NAME for p in directory.iterdir())
    if resume:
        if not (directory / LOOP_FILE).is_file():
            raise AdapterInputError(f"{directory / LOOP_FILE}: no loop state to resume (run without --resume)")
        return
    if has_state and not force:
        raise UsageError(f"{directory} is not empty; pass --resume to continue its run or --force to start over")
    if has_state:
        for name in (LOOP_FILE, HANDOFF_DIR, WORK_DIR, TRAINED_DIR):
            path = directory / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


@dataclass
class _Saved:
    run: str
    consumed: int
    digest: str
    band: Band | None
    progress: LoopProgress
    buffer: BufferState
    base_vectors: list[list[float]] = field(default_factory=list)


def _load(directory: Path) -> _Saved:
    path = directory / LOOP_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema_version") != LOOP_VERSION:
            raise ValueError(f"schema_version {doc.get('schema_version')!r}, expected {LOOP_VERSION}")
        buffer, _, _ = parse_state(doc["buffer"])
        band = None if doc["band"] is None else Band(**doc["band"])
        return _Saved(
            run=str(doc["run"]),
            consumed=int(doc["consumed_lines"]),
            digest=str(doc["consumed_sha256"]),
            band=band,
            progress=LoopProgress.from_json(doc["progress"]),
            buffer=buffer,
            base_vectors=[[float(x) for x in v] for v in doc.get("base_vectors", [])],
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterInputError(
            f"{path}: corrupt loop state ({type(exc).__name__}: {exc}); it was left as it is: "
            "move it away, or start over with --force"
        ) from None


def _save(directory: Path, saved: _Saved) -> None:
    """One file, written atomically: the buffer, the band, the counters and every training's outcome, as of the last
    line consumed."""
    doc = {
        "schema_version": LOOP_VERSION,
        "run": saved.run,
        "consumed_lines": saved.consumed,
        "consumed_sha256": saved.digest,
        "band": None if saved.band is None else saved.band.__dict__,
        "progress": saved.progress.to_json(),
        "base_vectors": saved.base_vectors,
        "buffer": json.loads(state_json(saved.buffer, saved.consumed, saved.digest)),
    }
    write_text_atomic(directory / LOOP_FILE, json.dumps(doc, allow_nan=False))


# --- one cluster ----------------------------------------------------------------------------------------------


def _entries_of(run: str, cluster: int, generation: int, *roots: Path) -> list[Path]:
    """Store or quarantine entries already made for ``generation`` of ``cluster`` of ``run`` (by a run killed
    after admitting)."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            record = entry / CLUSTER_RECORD_NAME
            if entry.is_dir() and record.is_file():
                try:
                    doc = json.loads(record.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if (doc.get("run"), doc.get("cluster"), doc.get("generation", 1)) == (run, cluster, generation):
                    found.append(entry)
    return found


def centre_of(vectors: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Unit mean of ``vectors`` [n, dim] centred on ``origin`` and scaled to unit length: [dim]."""
    return unit(unit(np.asarray(vectors, dtype=np.float64) - origin).mean(axis=0))


def adapt_cluster(
    lm: Any,
    embed: Embedder,
    records: Sequence[dict[str, Any]],
    *,
    run: str,
    cluster: int,
    bucket: str,
    keywords: Sequence[str],
    centre: np.ndarray | None,
    origin: np.ndarray | None,
    store: Path,
    work: Path,
    settings: LoopSettings,
    generation: int = 1,
    quarantine: Path | None = None,
    audit_log: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    seconds: dict[str, float] | None = None,
    keep: Path | None = None,
    base_vectors: np.ndarray | None = None,
) -> tuple[Any, Any]:
    """Train, gate and admit one cluster's adapter (``records``: its task objects). Returns the TrainResult and
    the GateOutcome; ``seconds`` (when given) accumulates the train and gate stages. ``keep`` (when given) receives
    the adapter before pruning as ``cluster-NNNN-gG`` (for comparison; never served). ``base_vectors``: embeddings
    of prompts the base model answered, whose centre routing keeps away from. ``work`` is emptied afterwards."""
    seconds = seconds if seconds is not None else {}
    work = Path(work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        start = time.perf_counter()
        trained = train_cluster(lm.model, lm.tokenizer, records, work, settings.train, progress)
        seconds["train"] = seconds.get("train", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        prompts = [e.prompt for e in (*trained.train, *trained.validation)]
        vectors = np.asarray(embed(prompts), dtype=np.float64)
        if origin is None:
            origin = vectors.mean(axis=0)
        base = None if base_vectors is None or not len(base_vectors) else centre_of(base_vectors, origin)
        record = cluster_record(
            run=run,
            cluster=cluster,
            generation=generation,
            bucket=bucket,
            keywords=keywords,
            members=len(records),
            centre=centre,
            prompt_centre=centre_of(vectors, origin),
            origin=origin,
            embedder=embed.name,
            base_model=str(lm.source),
            train=trained.to_json(),
            base_centre=base,
        )
        outcome = gate_adapter(
            lm.model,
            lm.tokenizer,
            trained.adapter_dir,
            trained.validation,
            trained.best.validation,
            record,
            store,
            work,
            f"cluster-{cluster:04d}",
            settings.gate,
            settings.train,
            quarantine=quarantine,
            audit_log=audit_log,
            progress=progress,
        )
        seconds["gate"] = seconds.get("gate", 0.0) + time.perf_counter() - start
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            kept = keep / f"cluster-{cluster:04d}-g{generation}"
            shutil.rmtree(kept, ignore_errors=True)
            trained.adapter_dir.rename(kept)
        return trained, outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _outcome(cluster: Cluster, generation: int, trained: Any, gated: Any) -> ClusterOutcome:
    record = gated.admit.record
    return ClusterOutcome(
        cluster=cluster.id,
        members=len(cluster.members),
        keywords=list(cluster.keywords),
        verdict=record["verdict"],
        entry=record["name"],
        destination=record["destination"],
        validation_before=gated.before.exact_match,
        validation_after=gated.after.exact_match,
        pruned_layers=len(gated.pruned_layers),
        scored_layers=gated.scored_layers,
        reasons=list(record["reasons"]),
        candidates=len(trained.candidates),
        generation=generation,
        distinct=len(trained.train) + len(trained.validation),
    )


def _outcome_of_entry(cluster: Cluster, entry: Path) -> ClusterOutcome:
    doc = json.loads((entry / CLUSTER_RECORD_NAME).read_text(encoding="utf-8"))
    admit_record = entry / ADMIT_RECORD_NAME
    reasons = json.loads(admit_record.read_text(encoding="utf-8"))["reasons"] if admit_record.is_file() else []
    v = doc.get("validation", {})
    return ClusterOutcome(
        cluster=cluster.id,
        members=int(doc.get("members", len(cluster.members))),
        keywords=list(cluster.keywords),
        verdict="refused" if admit_record.is_file() else "admitted",
        entry=entry.name,
        destination=str(entry.resolve()),
        validation_before=v.get("before_pruning", {}).get("exact_match", float("nan")),
        validation_after=v.get("after_pruning", {}).get("exact_match", float("nan")),
        pruned_layers=len(doc.get("pruning", {}).get("layers", [])),
        scored_layers=int(doc.get("pruning", {}).get("scored_layers", 0)),
        reasons=reasons,
        candidates=len(doc.get("train", {}).get("candidates", [])),
        generation=int(doc.get("generation", 1)),
        distinct=int(doc.get("train", {}).get("train_samples", 0))
        + int(doc.get("train", {}).get("validation_samples", 0)),
    )


# --- the loop -------------------------------------------------------------------------------------------------


def run_loop(
    lm: Any,
    embed: Embedder,
    lines: Iterable[str],
    store: Path,
    state: Path,
    settings: LoopSettings,
    *,
    resume: bool = False,
    strict: bool = False,
    quarantine: Path | None = None,
    audit_log: Path | None = None,
    on_event: Event | None = None,
    on_bad_line: Callable[[str], None] | None = None,
) -> LoopReport:
    """Run the loop over the task stream ``lines`` (JSON lines {"prompt", "answer", "tag"?}).

    Each batch of ``settings.batch_size`` samples is routed and answered (by the adapter whose cluster a prompt
    falls in, else by the base model), judged by the Trigger (the first ``trigger.warmup`` samples fix the
    similarity band; they are held until then), and the triggered samples go to the buffer. After each batch
    every cluster that is due (``_Loop.due``: handed off, or grown by ``settings.min_new`` distinct samples since
    its last training) is trained, gated and admitted to ``store``, then the state is saved (one file,
    atomically). With ``resume`` the consumed lines are checked (sha256) and skipped, and a generation whose
    adapter a killed run had already admitted is not trained again."""
    began = time.perf_counter()
    state, store = Path(state), Path(store)
    saved = _resumed(state, embed) if resume else _fresh(embed)
    shutil.rmtree(state / WORK_DIR, ignore_errors=True)
    loop = _Loop(lm, embed, store, state, settings, saved, quarantine, audit_log, on_event)
    loop.consume(lines, strict, on_bad_line)
    loop.finish()
    return LoopReport(
        progress=saved.progress,
        clusters=len(saved.buffer.clusters),
        buffered=sum(len(b.samples) for b in saved.buffer.buckets.values()),
        lines=saved.consumed,
        run=saved.run,
        seconds=time.perf_counter() - began,
        store=store,
        state=state,
    )


def _resumed(state: Path, embed: Embedder) -> _Saved:
    saved = _load(state)
    if saved.buffer.embedder != embed.name:
        raise UsageError(
            f"{state / LOOP_FILE} was built with {saved.buffer.embedder}, not {embed.name}; resume "
            "with the same model or --embedder"
        )
    return saved


def _fresh(embed: Embedder) -> _Saved:
    return _Saved(
        run=uuid.uuid4().hex[:12],
        consumed=0,
        digest=hashlib.sha256().hexdigest(),
        band=None,
        progress=LoopProgress(),
        buffer=BufferState(embedder=embed.name),
    )


Judged = tuple[Task, Any, np.ndarray, Any]
"""A sample answered and measured: its task, its route, its prompt vector and its signals."""


class _Loop:
    """One run of the loop: the stream read batch by batch (``consume``), then what is left (``finish``)."""

    def __init__(
        self,
        lm: Any,
        embed: Embedder,
        store: Path,
        state: Path,
        settings: LoopSettings,
        saved: _Saved,
        quarantine: Path | None,
        audit_log: Path | None,
        on_event: Event | None,
    ) -> None:
        self.lm, self.embed, self.store, self.state, self.settings = lm, embed, store, state, settings
        self.saved, self.quarantine, self.audit_log, self.on_event = saved, quarantine, audit_log, on_event
        self.refused = Path(quarantine) if quarantine is not None else quarantine_dir(store)
        self.progress = saved.progress
        self.buffer = TriggerBuffer(saved.buffer, settings.buffer)
        self.router = Router(lm.model, lm.tokenizer, embed, [], threshold=settings.route_threshold)
        self._reload_router()
        self.hasher = hashlib.sha256()
        self.held: list[Judged] = []  # warm-up samples, judged once the band is known
        self.warm: list[float] = []
        self.number = 0  # the last line read

    def event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message, self.progress)

    def timed(self, stage: str, start: float) -> None:
        self.progress.seconds[stage] = self.progress.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _reload_router(self) -> None:
        """The router over this run's admitted clusters."""
        self.router.reload(self.store)
        self.router.clusters = [c for c in self.router.clusters if c.run == self.saved.run]

    def consume(self, lines: Iterable[str], strict: bool, on_bad_line: Callable[[str], None] | None) -> None:
        """Read the stream: skip (and check) what a resumed run consumed, process each full batch."""
        saved = self.saved
        pending: list[Task] = []
        for self.number, text in enumerate(lines, start=1):
            self.hasher.update(text.encode("utf-8"))
            if self.number <= saved.consumed:
                if self.number == saved.consumed and self.hasher.hexdigest() != saved.digest:
                    raise AdapterInputError(
                        f"the first {saved.consumed} lines of the input are not those the state in "
                        f"{self.state} has consumed; resume with the same input"
                    )
                continue
            if not text.strip():
                continue
            try:
                pending.append(parse_task(text, self.number))
            except AdapterInputError as exc:
                if strict:
                    raise
                self.progress.bad_lines += 1
                if on_bad_line is not None:
                    on_bad_line(str(exc))
            if len(pending) >= self.settings.batch_size:
                self.process(pending)
                pending = []
                self.checkpoint()
                self.handle_ready()
                self.event(f"line {self.number}")
        if self.number < saved.consumed:
            raise AdapterInputError(
                f"the input has {self.number} lines but the state in {self.state} has consumed "
                f"{saved.consumed}; resume with the same input"
            )
        if pending:
            self.process(pending)

    def finish(self) -> None:
        """Judge a warm-up the stream was too short to end, hand off and save."""
        saved = self.saved
        if self.held:  # a stream shorter than the warm-up: the band of what there was
            saved.band = similarity_band(self.warm, self.settings.trigger)
            items, self.held[:] = list(self.held), []
            self.judge(items)
        self.handle_ready()
        saved.consumed, saved.digest = max(self.number, saved.consumed), self.hasher.hexdigest()
        _save(self.state, saved)
        write_handoff(self.state, saved.buffer, self.buffer.ready())

    def process(self, batch: list[Task]) -> None:
        """Route, answer and measure one batch; judge it (or hold it while the warm-up lasts)."""
        settings, progress = self.settings, self.progress
        start = time.perf_counter()
        prompts = [t.prompt for t in batch]
        vectors = self.embed(prompts)
        routes = self.router.route(prompts, vectors)
        progress.routed += sum(r.cluster is not None for r in routes)
        self.timed("route", start)
        start = time.perf_counter()
        answered = self.router.answer(prompts, settings.max_new_tokens, routes, batch_size=settings.batch_size)
        signals = measure_signals(batch, [g for _, g in answered], self.embed)
        self.timed("trigger", start)
        progress.samples += len(batch)
        items = [(t, r, v, s) for t, (r, _), v, s in zip(batch, answered, vectors, signals, strict=True)]
        if self.saved.band is None and settings.trigger.warmup > 0:
            self.held.extend(items)
            self.warm.extend(s.similarity for s in signals[: max(settings.trigger.warmup - len(self.warm), 0)])
            if len(self.warm) < settings.trigger.warmup:
                return
            self.saved.band = similarity_band(self.warm, settings.trigger)
            items, self.held[:] = list(self.held), []
        self.judge(items)

    def judge(self, items: list[Judged]) -> None:
        """The Trigger's decision on each sample: a failure goes to the buffer, which assigns it to the cluster it
        falls in (by prompt and gold answer: a prompt routed to the wrong adapter still finds its own cluster) or
        keeps it for a later clustering."""
        saved, settings = self.saved, self.settings
        for task, route, vector, signals in items:
            score, _ = failure_score(signals, settings.trigger, saved.band)
            if score < settings.trigger.threshold:
                if route.cluster is None and len(saved.base_vectors) < BASE_SAMPLES:
                    saved.base_vectors.append([float(x) for x in vector])
                continue
            self.progress.triggered += 1
            self.progress.routed_triggered += route.cluster is not None
            start = time.perf_counter()
            sample_text = f"{task.prompt}\n{task.answer}"
            embedding = np.asarray(self.embed([sample_text])[0], dtype=np.float32)
            self.buffer.add(
                Sample(line=task.line, text=sample_text, record=task.record, embedding=embedding),
                (task.tag or "") if settings.bucket_by_tag else "all",
            )
            self.timed("buffer", start)

    def checkpoint(self) -> None:
        if self.held:  # still in the warm-up: a resume starts it again
            return
        self.saved.consumed, self.saved.digest = self.number, self.hasher.hexdigest()
        _save(self.state, self.saved)

    def handle_ready(self) -> list[ClusterOutcome]:
        """Train, gate and admit every cluster handed off that is due (``due``); count, save and return each
        outcome."""
        saved, progress = self.saved, self.progress
        trained = []
        for cluster in self.buffer.ready():
            generation = self.due(cluster)
            if generation is None:
                continue
            write_handoff(self.state, saved.buffer, self.buffer.ready())
            earlier = _entries_of(saved.run, cluster.id, generation, self.store, self.refused)
            outcome = _outcome_of_entry(cluster, earlier[0]) if earlier else self.adapt(cluster, generation)
            progress.adapters_trained += 1
            progress.pruned_layers += outcome.pruned_layers
            if outcome.verdict == "admitted":
                progress.admitted += 1
            else:
                progress.quarantined += 1
            progress.clusters.append(outcome)
            self._reload_router()
            _save(self.state, saved)
            self.event(f"cluster {cluster.id}: {outcome.verdict} as {outcome.entry}")
            trained.append(outcome)
        return trained

    def due(self, cluster: Cluster) -> int | None:
        """The generation of ``cluster`` to train now, or None.

        A cluster is trained when it is handed off, and again, as its next generation, once ``min_new`` distinct
        (prompt, answer) pairs have joined it since its last training: failures the buffer assigned to it, those of
        prompts its adapter answered included (a cluster whose adapter was refused keeps growing, too). Each
        generation trains on all its members."""
        trainings = [o for o in self.progress.clusters if o.cluster == cluster.id]
        if not trainings:
            return 1
        last = trainings[-1]
        trained = last.distinct if last.distinct is not None else last.members
        new = len(examples_of([s.record for s in cluster.members])) - trained
        return last.generation + 1 if new >= self.settings.min_new else None

    def adapt(self, cluster: Cluster, generation: int) -> ClusterOutcome:
        """Train, gate and admit one generation of a cluster's adapter on its members."""
        saved, records = self.saved, [s.record for s in cluster.members]
        self.event(
            f"training cluster {cluster.id}"
            + (f" (generation {generation})" if generation > 1 else "")
            + f" ({len(records)} samples: {' '.join(cluster.keywords)})"
        )

        def step(what: str, done: int, total: int, cid: int = cluster.id) -> None:
            self.event(f"cluster {cid}: {what} {done}/{total}")

        trained, gated = adapt_cluster(
            self.lm,
            self.embed,
            records,
            run=saved.run,
            cluster=cluster.id,
            bucket=cluster.bucket,
            keywords=cluster.keywords,
            centre=cluster.centre,
            origin=saved.buffer.buckets[cluster.bucket].origin,
            store=self.store,
            work=self.state / WORK_DIR,
            settings=self.settings,
            generation=generation,
            quarantine=self.quarantine,
            audit_log=self.audit_log,
            progress=step,
            seconds=self.progress.seconds,
            keep=self.state / TRAINED_DIR,
            base_vectors=np.asarray(saved.base_vectors, dtype=np.float64),
        )
        self.progress.candidates_trained += len(trained.candidates)
        return _outcome(cluster, generation, trained, gated)


# --- refresh --------------------------------------------------------------------------------------------------


def refresh_adapters(
    lm: Any,
    embed: Embedder,
    store: Path,
    state: Path,
    settings: LoopSettings,
    *,
    quarantine: Path | None = None,
    audit_log: Path | None = None,
    on_event: Event | None = None,
) -> list[ClusterOutcome]:
    """Train now every cluster of the run in ``state`` that is due (``_Loop.due``, with ``settings.min_new``):
    handed off and never trained (a run stopped meanwhile), or with ``min_new`` distinct samples more than its last
    training, as its next generation, through the same gate. The state is saved after each. Returns the
    outcomes."""
    saved = _resumed(Path(state), embed)
    loop = _Loop(lm, embed, Path(store), Path(state), settings, saved, quarantine, audit_log, on_event)
    return loop.handle_ready()
