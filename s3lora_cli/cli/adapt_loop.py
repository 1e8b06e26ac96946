"""``s3lora adapt train | answer | refresh | run``: the LoRA store side of self-adaptation (train a cluster's
adapter, gate it with s3lora and admit it; route prompts to the stored adapters; the whole loop). The libraries
are imported inside the commands."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from s3lora_cli.cli.adapt import (
    ADAPT_DEVICE,
    ASSIGN_THRESHOLD,
    EMBEDDER,
    STRICT,
    WEIGHT_EXACT,
    BucketBy,
    _input_lines,
    _load_embedding,
    _require_extra,
    adapt_app,
    escape,
)
from s3lora_cli.cli.boundary import ExitCode, error_boundary
from s3lora_cli.cli.options import (
    FORMAT,
    AuditLog,
    Baseline,
    Fraction,
    MaxIncrease,
    MaxSsi,
    MaxViolations,
    Output,
    PolicyFile,
    Quarantine,
    Quiet,
    StoreOption,
    StrictLayers,
    as_default,
    gate_flags,
)
from s3lora_cli.cli.output import check_output, stderr_console, write_output
from s3lora_cli.errors import AdapterInputError, UsageError

MODEL = typer.Option(..., "--model", help="The causal LM: a Hugging Face model directory or a .gguf file.")
STORE = as_default(StoreOption, ...)
QUARANTINE = as_default(Quarantine, None)
AUDIT_LOG = as_default(AuditLog, None)
SEARCH = typer.Option(
    None,
    "--search",
    help="A named training search replacing the policy's: default (r 8, alpha 16, lr 3e-3, 24 epochs; learns on a "
    "CPU in minutes) or paper (SAGE's r 4/8 x alpha 8/16 x lr 1e-4/1e-5).",
)
RANK = typer.Option(None, "--rank", "-r", help="Train this LoRA rank (replaces the search's ranks).")
ALPHA = typer.Option(None, "--alpha", help="lora_alpha (replaces the search's).")
LR = typer.Option(None, "--lr", help="Learning rate (replaces the search's).")
EPOCHS = typer.Option(None, "--epochs", help="Passes over the training split (replaces the search's; default 24).")
TARGETS = typer.Option(None, "--target-modules", help="Comma-separated module names to adapt (default q, k, v).")
SEED = typer.Option(0, "--seed", help="Fixes the 80/20 split, the initialisation and the batch order.")
TAU = typer.Option(None, "--tau", help="Prune the tau highest-SSI layers (default 10).")
THRESHOLD = typer.Option(None, "--prune-threshold", help="Prune every layer with SSI >= this (0-1).")
FRACTION = as_default(Fraction, None)
MAX_SSI = as_default(MaxSsi, None)
MAX_VIOLATIONS = as_default(MaxViolations, None)
BASELINE = as_default(Baseline, None)
MAX_INCREASE = as_default(MaxIncrease, None)
STRICT_LAYERS = as_default(StrictLayers, None)
POLICY = as_default(PolicyFile, None)
QUIET = as_default(Quiet, False)
OUTPUT = as_default(Output, None)
FLOOR = typer.Option(
    None,
    "--floor",
    help="Least validation exact match of the pruned adapter (default 0.5); below it the adapter is quarantined.",
)
ROUTE_THRESHOLD = typer.Option(
    None,
    "--route-threshold",
    help="Least cosine between a prompt and a cluster's prompt centre for the cluster's adapter to answer it "
    "(default 0.4; it must also be nearer to it than to the prompts the base model answered).",
)
MIN_NEW = typer.Option(
    None,
    "--min-new",
    help="Train a cluster again once this many new distinct samples came to it since its last training (default 5).",
)
MAX_NEW = typer.Option(32, "--max-new-tokens", min=1, help="Longest generated answer, in tokens.")


class ReportFormat(str, enum.Enum):
    table = "table"
    json = "json"


def _store_flags(rank, alpha, lr, epochs, targets, tau, threshold, fraction, floor) -> dict:
    """The LoRA store's flags, by their policy keys (None: not given)."""
    return {
        "r": rank,
        "lora_alpha": alpha,
        "learning_rate": lr,
        "epochs": epochs,
        "target_modules": targets,
        "tau": tau,
        "prune_threshold": threshold,
        "fraction": fraction,
        "floor": floor,
    }


def _gate_settings(store_policy, flags: dict, policy: Optional[Path], device: str):
    """The gate: what the store policy prunes and its floor, and the gate's rules (``admit``'s, from ``flags``
    over ``policy`` over pyproject; ``--max-ssi`` DEFAULT_MAX_SSI when none gives a rule)."""
    from s3lora_cli.adapt.admission import DEFAULT_MAX_SSI, GateSettings
    from s3lora_cli.gate import resolve_policy
    from s3lora_cli.selection import Selection

    selection = Selection.of(store_policy.tau, store_policy.prune_threshold, store_policy.fraction)
    try:
        gate_policy = resolve_policy(flags, policy)
    except UsageError as exc:
        if not str(exc).startswith("no gate rule given"):
            raise
        gate_policy = resolve_policy({**flags, "max-ssi": DEFAULT_MAX_SSI}, policy)
    return GateSettings(selection=selection, floor=store_policy.floor, policy=gate_policy, device=device)


def _loop_settings(flags: dict, policy: Optional[Path], search: Optional[str], rules: dict, device: str, **run):
    """The loop's settings: ``flags`` (policy keys; None: not given) over --policy over pyproject, training with
    ``run``'s seed and max_new_tokens, the gate with ``rules`` (``admit``'s flags); ``run`` also sets LoopSettings'
    own fields (batch size, bucketing)."""
    from s3lora_cli.adapt.loop import LoopSettings
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.adapt.train import TrainSettings

    resolved = resolve_adapt_policy(flags, policy, search=search)
    seed = run.pop("seed")
    return LoopSettings(
        trigger=resolved.trigger,
        buffer=resolved.buffer,
        train=TrainSettings.of(resolved.store, seed, run["max_new_tokens"]),
        gate=_gate_settings(resolved.store, rules, policy, device),
        route_threshold=resolved.store.route_threshold,
        min_new=resolved.store.min_new,
        **run,
    )


def _step_printer(quiet: bool):
    if quiet:
        return None
    console = stderr_console()

    def show(what: str, done: int, total: int) -> None:
        if done == total:
            console.print(f"{escape(what)}: {done}/{total}", highlight=False)

    return show


def _outcome_line(trained, gated) -> str:
    verdict = "admitted" if gated.admitted else "quarantined"
    reason = f" ({gated.admit.record['reasons'][0]})" if not gated.admitted and gated.admit.record["reasons"] else ""
    return (
        f"{verdict} {gated.admit.destination}: best {trained.best.candidate.describe()}, validation exact match "
        f"{gated.before.exact_match:.3f} -> {gated.after.exact_match:.3f} after pruning "
        f"{len(gated.pruned_layers)} of {gated.scored_layers} layers{reason}"
    )


@adapt_app.command("train")
@error_boundary
def train(
    cluster: Path = typer.Argument(
        ..., help='A cluster\'s JSONL file (the buffer\'s hand-off, or any {"prompt", "answer"} lines).'
    ),
    model: Path = MODEL,
    store: Path = STORE,
    quarantine: Optional[Path] = QUARANTINE,
    audit_log: Optional[Path] = AUDIT_LOG,
    embedder: Optional[Path] = EMBEDDER,
    search: Optional[str] = SEARCH,
    rank: Optional[int] = RANK,
    alpha: Optional[int] = ALPHA,
    lr: Optional[float] = LR,
    epochs: Optional[int] = EPOCHS,
    target_modules: Optional[str] = TARGETS,
    seed: int = SEED,
    tau: Optional[int] = TAU,
    prune_threshold: Optional[float] = THRESHOLD,
    fraction: Optional[float] = FRACTION,
    floor: Optional[float] = FLOOR,
    max_ssi: Optional[float] = MAX_SSI,
    max_violations: Optional[int] = MAX_VIOLATIONS,
    baseline: Optional[Path] = BASELINE,
    max_increase: Optional[float] = MAX_INCREASE,
    strict_layers: Optional[bool] = STRICT_LAYERS,
    policy: Optional[Path] = POLICY,
    max_new_tokens: int = MAX_NEW,
    device: str = ADAPT_DEVICE,
    fmt: ReportFormat = as_default(Annotated[ReportFormat, FORMAT], ReportFormat.table),
    quiet: bool = QUIET,
) -> None:
    """Train LoRA adapters on one cluster (seeded 80/20 split, the search's candidates ranked by validation exact
    match then loss), prune the best one's sharpest layers, evaluate the pruned adapter on the validation split
    and admit it to --store (exit 0) or quarantine it (exit 1) with the cluster's record beside it."""
    _require_extra()
    import numpy as np

    from s3lora_cli.adapt.loop import adapt_cluster

    settings = _loop_settings(
        _store_flags(rank, alpha, lr, epochs, target_modules, tau, prune_threshold, fraction, floor),
        policy,
        search,
        gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers, None, None, None),
        device,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    records, info = _read_cluster(cluster)
    lm, embed = _load_embedding(model, embedder, device, need_lm=True)
    run = hashlib.sha256(str(cluster.resolve().parent).encode()).hexdigest()[:12]  # one per hand-off directory
    work = _work_dir(store)
    try:
        trained, gated = adapt_cluster(
            lm,
            embed,
            records,
            run=run,
            cluster=info.get("id", 0),
            bucket=info.get("bucket", "all"),
            keywords=info.get("keywords", []),
            centre=None if info.get("centre") is None else np.asarray(info["centre"]),
            origin=None if info.get("origin") is None else np.asarray(info["origin"], dtype=np.float64),
            store=store,
            work=work,
            settings=settings,
            quarantine=quarantine,
            audit_log=audit_log,
            progress=_step_printer(quiet),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "cluster": str(cluster),
        "train": trained.to_json(),
        "pruned_layers": list(gated.pruned_layers),
        "validation_before": gated.before.__dict__,
        "validation_after": gated.after.__dict__,
        "verdict": gated.admit.record["verdict"],
        "reasons": gated.admit.record["reasons"],
        "destination": str(gated.admit.destination),
    }
    if fmt is ReportFormat.json:
        write_output(json.dumps(doc, allow_nan=False) + "\n", None, False)
    else:
        write_output(_outcome_line(trained, gated) + "\n", None, False)
    if not gated.admitted:
        raise typer.Exit(ExitCode.GATE_FAILED)


def _work_dir(store: Path) -> Path:
    """A private scratch directory beside the store, for the candidates and the pruned copy."""
    return store.absolute().parent / f".{store.name}.train-{os.getpid()}"


def _read_cluster(path: Path) -> tuple[list[dict], dict]:
    """The records of a cluster file and, when it lies in a hand-off directory, its manifest entry."""
    from s3lora_cli.adapt.state import MANIFEST

    records = []
    with _input_lines(path) as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise AdapterInputError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise AdapterInputError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    info: dict = {}
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
            info = next((c for c in doc.get("clusters", []) if c.get("file") == path.name), {})
        except (OSError, ValueError, AttributeError) as exc:
            raise AdapterInputError(f"{manifest}: corrupt manifest ({exc})") from None
    return records, info


@adapt_app.command("answer")
@error_boundary
def answer(
    prompts: list[str] = typer.Argument(..., help="The prompts to answer."),
    model: Path = MODEL,
    store: Path = typer.Option(..., "--store", help="The LoRA store directory."),
    embedder: Optional[Path] = EMBEDDER,
    route_threshold: Optional[float] = ROUTE_THRESHOLD,
    policy: Optional[Path] = POLICY,
    max_new_tokens: int = MAX_NEW,
    device: str = ADAPT_DEVICE,
    quiet: bool = QUIET,
) -> None:
    """Answer each prompt with the adapter of the stored cluster it falls in (when one passes the route
    threshold), else with the base model; one JSON line per prompt on stdout ({"prompt", "used", "score",
    "answer"}), which model answered on stderr."""
    _require_extra()
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.adapt.routing import Router, stored_clusters

    threshold = resolve_adapt_policy({"route_threshold": route_threshold}, policy).store.route_threshold
    if not store.is_dir():
        raise AdapterInputError(f"--store {store}: no such directory")
    lm, embed = _load_embedding(model, embedder, device, need_lm=True)
    router = Router(lm.model, lm.tokenizer, embed, stored_clusters(store), threshold=threshold)
    console = stderr_console()
    lines = []
    for prompt, (route, generation) in zip(prompts, router.answer(prompts, max_new_tokens), strict=True):
        lines.append(
            json.dumps(
                {
                    "prompt": prompt,
                    "used": route.used,
                    "score": round(route.score, 6) if route.nearest is not None else None,
                    "answer": generation.text,
                },
                allow_nan=False,
            )
            + "\n"
        )
        if not quiet:
            console.print(
                f"answered by {escape(route.used)}"
                + (
                    f" (score {route.score:.3f}, nearest {escape(route.nearest.name)})"
                    if route.nearest is not None
                    else " (no stored cluster)"
                ),
                highlight=False,
            )
    write_output("".join(lines), None, False)


@adapt_app.command("refresh")
@error_boundary
def refresh(
    model: Path = MODEL,
    store: Path = STORE,
    state: Path = typer.Option(
        ..., "--state", help="The state directory of the 'adapt run' whose samples to train on."
    ),
    quarantine: Optional[Path] = QUARANTINE,
    audit_log: Optional[Path] = AUDIT_LOG,
    embedder: Optional[Path] = EMBEDDER,
    min_new: Optional[int] = MIN_NEW,
    search: Optional[str] = SEARCH,
    rank: Optional[int] = RANK,
    alpha: Optional[int] = ALPHA,
    lr: Optional[float] = LR,
    epochs: Optional[int] = EPOCHS,
    target_modules: Optional[str] = TARGETS,
    seed: int = SEED,
    tau: Optional[int] = TAU,
    prune_threshold: Optional[float] = THRESHOLD,
    fraction: Optional[float] = FRACTION,
    floor: Optional[float] = FLOOR,
    policy: Optional[Path] = POLICY,
    max_new_tokens: int = MAX_NEW,
    device: str = ADAPT_DEVICE,
    quiet: bool = QUIET,
) -> None:
    """Train now what the run in --state has due: every cluster with --min-new distinct samples more than its last
    training (failures the buffer assigned to it during 'adapt run'), as its next generation, through the same gate
    (routing uses the latest admitted generation), and any cluster handed off but not trained yet. Prints one JSON
    line per adapter trained."""
    _require_extra()
    from s3lora_cli.adapt.loop import LOOP_FILE, refresh_adapters, state_locked

    flags = _store_flags(rank, alpha, lr, epochs, target_modules, tau, prune_threshold, fraction, floor)
    flags["min_new"] = min_new
    settings = _loop_settings(flags, policy, search, {}, device, seed=seed, max_new_tokens=max_new_tokens)
    if not (state / LOOP_FILE).is_file():
        raise AdapterInputError(f"--state {state}: no 'adapt run' state there ({LOOP_FILE})")
    console = stderr_console()
    with state_locked(state):
        lm, embed = _load_embedding(model, embedder, device, need_lm=True)
        results = refresh_adapters(
            lm,
            embed,
            store,
            state,
            settings,
            quarantine=quarantine,
            audit_log=audit_log,
            on_event=None if quiet else lambda message, _: console.print(escape(message), highlight=False),
        )
    write_output("".join(json.dumps(r.to_json(), allow_nan=False) + "\n" for r in results), None, False)
    if not quiet:
        console.print(f"{len(results)} adapter(s) trained", highlight=False)


@adapt_app.command("run")
@error_boundary
def run(
    model: Path = MODEL,
    tasks: Path = typer.Option(..., "--tasks", help='JSONL task stream ({"prompt", "answer", "tag"}).'),
    store: Path = STORE,
    state: Path = typer.Option(..., "--state", help="Directory of the loop's state (resumable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state."),
    force: bool = typer.Option(
        False, "--force", help="Start over, replacing the state in --state (never the store) and the --output file."
    ),
    quarantine: Optional[Path] = QUARANTINE,
    audit_log: Optional[Path] = AUDIT_LOG,
    embedder: Optional[Path] = EMBEDDER,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Failure score that triggers (default 0.5)."),
    weight_exact: Optional[float] = WEIGHT_EXACT,
    warmup: Optional[int] = typer.Option(None, "--warmup", help="First samples taken as in-distribution (default 20)."),
    min_buffer: Optional[int] = typer.Option(
        None, "--min-buffer", help="Samples before the first re-clustering (default 25)."
    ),
    min_cluster: Optional[int] = typer.Option(
        None, "--min-cluster", help="Members before a cluster is trained (default 10)."
    ),
    assign_threshold: Optional[float] = ASSIGN_THRESHOLD,
    bucket_by: BucketBy = typer.Option(BucketBy.none, "--bucket-by", help="none (one bucket) or tag."),
    search: Optional[str] = SEARCH,
    rank: Optional[int] = RANK,
    alpha: Optional[int] = ALPHA,
    lr: Optional[float] = LR,
    epochs: Optional[int] = EPOCHS,
    target_modules: Optional[str] = TARGETS,
    seed: int = SEED,
    tau: Optional[int] = TAU,
    prune_threshold: Optional[float] = THRESHOLD,
    fraction: Optional[float] = FRACTION,
    floor: Optional[float] = FLOOR,
    max_ssi: Optional[float] = MAX_SSI,
    max_violations: Optional[int] = MAX_VIOLATIONS,
    policy: Optional[Path] = POLICY,
    route_threshold: Optional[float] = ROUTE_THRESHOLD,
    min_new: Optional[int] = MIN_NEW,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples answered together."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Longest generated answer, in tokens."),
    fmt: ReportFormat = as_default(Annotated[ReportFormat, FORMAT], ReportFormat.table),
    output: Optional[Path] = OUTPUT,
    strict: bool = STRICT,
    device: str = ADAPT_DEVICE,
    quiet: bool = QUIET,
) -> None:
    """The whole loop: route and answer each sample, trigger on failures, cluster them, and train, prune, gate and
    admit an adapter per cluster handed off, as the samples stream in. A live summary goes to stderr; the final
    report (samples, triggered, clusters, adapters trained, pruned layers, admitted, quarantined, seconds per
    stage) to stdout. Stopped (Ctrl-C, exit 130), it continues with --resume."""
    _require_extra()
    from s3lora_cli.adapt.loop import prepare_loop_state, run_loop, state_locked

    flags = _store_flags(rank, alpha, lr, epochs, target_modules, tau, prune_threshold, fraction, floor)
    flags.update(
        warmup=warmup,
        threshold=threshold,
        weight_exact=weight_exact,
        min_buffer=min_buffer,
        min_cluster=min_cluster,
        assign_threshold=assign_threshold,
        route_threshold=route_threshold,
        min_new=min_new,
    )
    settings = _loop_settings(
        flags,
        policy,
        search,
        gate_flags(max_ssi, max_violations, None, None, None, None, None, None),
        device,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        bucket_by_tag=bucket_by is BucketBy.tag,
    )
    check_output(output, force)
    if state.resolve() in (tasks.resolve(), *tasks.resolve().parents) or store.resolve() == state.resolve():
        raise UsageError(f"--state {state} overlaps --tasks or --store; give the state its own directory")
    with state_locked(state):
        prepare_loop_state(state, resume=resume, force=force)
        lm, embed = _load_embedding(model, embedder, device, need_lm=True)
        console = stderr_console()
        status = _LiveStatus(console, quiet)
        try:
            with _input_lines(tasks) as lines, status:
                result = run_loop(
                    lm,
                    embed,
                    lines,
                    store,
                    state,
                    settings,
                    resume=resume,
                    strict=strict,
                    quarantine=quarantine,
                    audit_log=audit_log,
                    on_event=status.update,
                    on_bad_line=lambda m: console.print(f"[yellow]skipped[/] {escape(m)}", highlight=False),
                )
        except KeyboardInterrupt:
            console.print(
                f"interrupted; the state in {escape(str(state))} is saved and the store holds only whole "
                "adapters: --resume continues",
                highlight=False,
            )
            raise typer.Exit(130) from None
    from s3lora_cli.adapt.render import loop_table

    doc = result.to_json()
    text = json.dumps(doc, allow_nan=False) + "\n" if fmt is ReportFormat.json else loop_table(doc)
    write_output(text, output, force)
    if not quiet and (fmt is ReportFormat.json or output is not None):
        console.print(loop_table(doc), highlight=False, markup=False, soft_wrap=True)


class _LiveStatus:
    """The live summary on stderr: one status line (a Rich spinner on a terminal, else a line per cluster
    event)."""

    EVERY = 40
    """Without a terminal, a line at least every this many samples, and at every cluster event."""

    def __init__(self, console, quiet: bool):
        self.console, self.quiet = console, quiet
        self._status = None
        self._shown = 0

    def __enter__(self):
        if not self.quiet and self.console.is_terminal:
            self._status = self.console.status("starting")
            self._status.__enter__()
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)
        return False

    def update(self, message: str, progress) -> None:
        if self.quiet:
            return
        line = (
            f"{progress.samples} samples, {progress.triggered} triggered, {progress.routed} routed, "
            f"{progress.admitted} admitted, {progress.quarantined} quarantined | {message}"
        )
        if self._status is not None:
            self._status.update(escape(line))
            return
        step = message.startswith(("line ", "cluster ")) and not message.split(": ", 1)[-1].startswith(
            ("admitted", "refused")
        )
        if not step or (message.startswith("line ") and progress.samples - self._shown >= self.EVERY):
            self._shown = progress.samples
            self.console.print(escape(line), highlight=False, soft_wrap=True)
