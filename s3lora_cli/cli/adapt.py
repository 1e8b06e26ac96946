"""``s3lora adapt``: the self-adaptation commands (trigger, cluster, demo-tasks here; train, answer, refresh and
run in ``adapt_loop``). The adapt subsystem and its libraries are imported inside the commands, so the rest of
the CLI never loads them."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import error_boundary
from s3lora_cli.cli.options import Force, Output, PolicyFile, Quiet
from s3lora_cli.cli.output import Target, check_output, escape, stderr_console, write_output
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, UsageError

ADAPT_EXTRA_HINT = "install the adapt extra: pip install 's3lora[adapt]'"

adapt_app = typer.Typer(
    name="adapt",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Self-adaptation (SAGE): find the samples a model fails, cluster them, train an "
    "adapter per cluster, gate it into a LoRA store, and route prompts to it.",
)
app.add_typer(adapt_app, name="adapt")

MODEL = typer.Option(None, "--model", help="The causal LM: a Hugging Face model directory or a .gguf file.")
EMBEDDER = typer.Option(
    None,
    "--embedder",
    help="An encoder directory (e.g. a sentence-transformers model) to "
    "embed with, instead of the model's own mean-pooled hidden states.",
)
ADAPT_DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
STRICT = typer.Option(False, "--strict", help="Stop at the first bad input line (exit 3) instead of skipping it.")
WEIGHT_EXACT = typer.Option(
    None,
    "--weight-exact",
    help="Weight of a wrong exact match in the failure score (default 0, SAGE's signals alone): catches a wrong fact "
    "in the gold answer's own words.",
)
ASSIGN_THRESHOLD = typer.Option(
    None,
    "--assign-threshold",
    help="Least 0.7 cosine + 0.3 keyword overlap for a triggered sample to join a stored cluster (default 0.6); "
    "below it, the sample waits in the buffer for the next clustering.",
)


class BucketBy(str, enum.Enum):
    none = "none"
    tag = "tag"


def _require_extra() -> None:
    for module in ("sklearn", "scipy", "sacrebleu", "rouge_score", "transformers"):
        try:
            __import__(module)
        except ImportError:
            raise RuntimeProblem(f"{module} is not installed: {ADAPT_EXTRA_HINT}") from None


@contextmanager
def _input_lines(path: Path) -> Iterator[Iterator[str]]:
    """The lines of ``path`` (or stdin for '-'), read lazily; a missing file is an input problem."""
    if str(path) == "-":
        yield iter(sys.stdin)
        return
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AdapterInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise AdapterInputError(f"{path}: cannot be read: {exc}") from None
    with handle:
        try:
            yield iter(handle)
        except UnicodeDecodeError as exc:
            raise AdapterInputError(f"{path}: not UTF-8 text ({exc})") from None


def _jsonl_sink(output: Optional[Path], force: bool):
    """Where JSON lines go: stdout, or ``output`` written atomically once complete."""
    return Target(output, force).stream()


def _same_file(a: Path, b: Optional[Path]) -> bool:
    return b is not None and str(a) != "-" and Path(a).resolve() == Path(b).resolve()


def _load_embedding(model: Optional[Path], embedder: Optional[Path], device: str, need_lm: bool):
    from s3lora_cli.adapt.embedding import load_encoder_embedder, model_embedder
    from s3lora_cli.lm import load_causal_lm

    if model is None and (need_lm or embedder is None):
        raise UsageError("--model is required" + ("" if need_lm else " (or --embedder)"))
    lm = load_causal_lm(model, device=device) if model is not None and (need_lm or embedder is None) else None
    embed = load_encoder_embedder(embedder, device=device) if embedder is not None else model_embedder(lm)
    return lm, embed


def _progress(quiet: bool, label: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if quiet:
        return None, None
    bar = Progress(
        SpinnerColumn(),
        TextColumn(label),
        TextColumn("{task.completed} lines"),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
    )
    return bar, bar.add_task("", total=None)


@adapt_app.command("trigger")
@error_boundary
def trigger(
    model: Optional[Path] = MODEL,
    tasks: Path = typer.Option(
        ..., "--tasks", help='JSONL task stream ({"prompt", "answer", "tag"}); \'-\' reads stdin.'
    ),
    output: Output = None,
    force: Force = False,
    policy: PolicyFile = None,
    embedder: Optional[Path] = EMBEDDER,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples generated together."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Longest generated answer, in tokens."),
    warmup: Optional[int] = typer.Option(
        None, "--warmup", help="First samples taken as in-distribution, to fix the similarity band (default 20)."
    ),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Failure score that triggers (default 0.5)."),
    weight_exact: Optional[float] = WEIGHT_EXACT,
    strict: bool = STRICT,
    device: str = ADAPT_DEVICE,
    quiet: Quiet = False,
) -> None:
    """Generate each task's answer, score it against the gold answer (logit margin, BLEU, ROUGE-L, embedding
    similarity) and write every sample with its signals, score and decision as JSON lines; a summary per tag
    goes to stderr."""
    _require_extra()
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.adapt.tasks import BadLine, read_tasks
    from s3lora_cli.adapt.trigger import TriggerSummary, run_trigger

    flags = {"warmup": warmup, "threshold": threshold, "weight_exact": weight_exact}
    trigger_policy = resolve_adapt_policy(flags, policy).trigger
    if _same_file(tasks, output) or (model is not None and _same_file(model, output)):
        raise UsageError(f"{output} is an input; choose another --output")
    check_output(output, force)
    lm, embed = _load_embedding(model, embedder, device, need_lm=True)
    console = stderr_console()
    bad = 0
    summary = TriggerSummary()
    bar, task_id = _progress(quiet, "trigger")
    with _input_lines(tasks) as lines, _jsonl_sink(output, force) as sink:

        def good_tasks():
            nonlocal bad
            for item in read_tasks(lines, strict=strict):
                if isinstance(item, BadLine):
                    bad += 1
                    console.print(f"[yellow]skipped[/] {escape(item.message)}", highlight=False, soft_wrap=True)
                else:
                    yield item

        update = (lambda done: bar.update(task_id, completed=done)) if bar is not None else None
        with bar if bar is not None else nullcontext():
            for record in run_trigger(
                lm.model,
                lm.tokenizer,
                good_tasks(),
                trigger_policy,
                embed,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                summary=summary,
                progress=update,
            ):
                sink.write(json.dumps(record.to_json(), allow_nan=False) + "\n")
    if not quiet:
        _print_trigger_summary(summary, bad)


def _print_trigger_summary(summary, bad: int) -> None:
    from rich.table import Table

    table = Table(title="Trigger", title_justify="left")
    table.add_column("tag")
    table.add_column("samples", justify="right")
    table.add_column("triggered", justify="right")
    if any(tag is not None for tag in summary.per_tag):
        for tag, (n, hit) in sorted(summary.per_tag.items(), key=lambda item: str(item[0])):
            table.add_row("(none)" if tag is None else escape(tag), str(n), str(hit))
    table.add_row("all", str(summary.total), str(summary.triggered))
    console = stderr_console()
    console.print(table)
    if summary.band is not None:
        console.print(
            f"similarity band {summary.band.low:.3f}..{summary.band.high:.3f} "
            f"from {summary.band.count} warm-up samples",
            highlight=False,
        )
    if bad:
        console.print(f"{bad} bad line(s) skipped", highlight=False)


@adapt_app.command("cluster")
@error_boundary
def cluster(
    triggered: Path = typer.Argument(..., help="The JSONL output of 'adapt trigger' ('-' reads stdin)."),
    state: Path = typer.Option(..., "--state", help="Directory of the buffer's state and hand-off files."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state."),
    force: bool = typer.Option(False, "--force", help="Start over, replacing the state in --state."),
    model: Optional[Path] = MODEL,
    embedder: Optional[Path] = EMBEDDER,
    policy: PolicyFile = None,
    min_buffer: Optional[int] = typer.Option(
        None, "--min-buffer", help="Samples before the first re-clustering (default 25)."
    ),
    min_cluster: Optional[int] = typer.Option(
        None, "--min-cluster", help="Members before a cluster is handed off (default 10)."
    ),
    assign_threshold: Optional[float] = ASSIGN_THRESHOLD,
    bucket_by: BucketBy = typer.Option(BucketBy.none, "--bucket-by", help="none (one bucket) or tag."),
    strict: bool = STRICT,
    device: str = ADAPT_DEVICE,
    quiet: Quiet = False,
) -> None:
    """Cluster the triggered samples (HDBSCAN, re-run until stable), assign later ones online, merge close
    clusters, and hand off clusters of --min-cluster samples as JSONL files under STATE/clusters/ (manifest.json
    gives each centre). The run's summary is printed as JSON."""
    _require_extra()
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.adapt.state import HANDOFF_DIR, prepare_state_directory, run_buffer

    buffer_policy = resolve_adapt_policy(
        {"min_buffer": min_buffer, "min_cluster": min_cluster, "assign_threshold": assign_threshold}, policy
    ).buffer
    if str(triggered) != "-" and state.resolve() in (Path(triggered).resolve(), *Path(triggered).resolve().parents):
        raise UsageError(f"{triggered} is inside --state {state}; choose another state directory")
    prepare_state_directory(state, resume=resume, force=force)
    _, embed = _load_embedding(model, embedder, device, need_lm=False)
    console = stderr_console()
    bar, task_id = _progress(quiet, "cluster")
    try:
        with _input_lines(triggered) as lines, bar if bar is not None else nullcontext():
            summary = run_buffer(
                lines,
                state,
                buffer_policy,
                embed,
                resume=resume,
                bucket_by_tag=bucket_by is BucketBy.tag,
                strict=strict,
                progress=(lambda n: bar.update(task_id, completed=n)) if bar is not None else None,
                on_bad_line=lambda m: console.print(f"[yellow]skipped[/] {escape(m)}", highlight=False),
            )
    except KeyboardInterrupt:
        console.print(
            f"interrupted; the state in {escape(str(state))} is saved: --resume continues it", highlight=False
        )
        raise typer.Exit(130) from None
    doc = {
        "lines": summary.lines,
        "triggered": summary.triggered,
        "bad_lines": summary.bad,
        "reclusterings": summary.reclusterings,
        "stabilisations": summary.stabilisations,
        "clusters": summary.clusters,
        "handed_off": list(summary.handed_off),
        "buffered": summary.buffered,
        "handoff": str(state / HANDOFF_DIR),
    }
    write_output(json.dumps(doc, allow_nan=False) + "\n", None, False)
    if not quiet:
        console.print(
            f"{summary.clusters} cluster(s), {len(summary.handed_off)} handed off to "
            f"{escape(str(state / HANDOFF_DIR))}, {summary.buffered} sample(s) still buffered",
            highlight=False,
        )


@adapt_app.command("demo-tasks")
@error_boundary
def demo_tasks(
    output: Output = None,
    seed: int = typer.Option(0, "--seed", help="Fixes the order of the stream."),
    per_family: int = typer.Option(25, "--per-family", min=1, help="Samples of each family."),
    warmup: int = typer.Option(20, "--warmup", min=0, help="In-distribution samples at the head of the stream."),
    force: Force = False,
) -> None:
    """Write the offline demo task stream (JSONL): families the small model answers mixed with families it
    cannot, each sample's family in a 'family' field the pipeline never reads."""
    from s3lora_cli.adapt.demo import demo_jsonl

    target = Target(output, force)
    target.check()
    target.write(demo_jsonl(seed=seed, warmup=warmup, per_family=per_family))
