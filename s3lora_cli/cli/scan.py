"""``s3lora scan``: score every adapter under a store directory (cached; in processes or on Ray), ranked by risk."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from s3lora_cli.cli.app import app
from s3lora_cli.cli.boundary import ExitCode, error_boundary
from s3lora_cli.cli.options import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_NEIGHBOURS,
    DEFAULT_TOP,
    FORMAT,
    Baseline,
    Components,
    Device,
    DuplicateThreshold,
    Force,
    MaxIncrease,
    MaxSsi,
    MaxViolations,
    MethodOption,
    Neighbours,
    Output,
    PolicyFile,
    Quiet,
    StrictLayers,
    TopH,
    gate_flags,
)
from s3lora_cli.cli.output import Target, check_apart, print_summary, stderr_console
from s3lora_cli.errors import UsageError

__all__ = ["DEFAULT_DUPLICATE_THRESHOLD", "DEFAULT_NEIGHBOURS", "DEFAULT_TOP", "ScanFormat", "scan"]


class ScanFormat(str, enum.Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


Store = Annotated[Path, typer.Argument(metavar="STORE", help="Directory of adapters, searched recursively.")]
Workers = Annotated[int, typer.Option("--workers", "-j", help="Local worker processes.")]
Ray = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help="Run on Ray: auto (the running cluster), an ADDRESS (host:port), or local (start Ray here). Needs pip "
        "install 's3lora[ray]'.",
    ),
]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Score cache (default <store>/.s3lora-cache).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Score every adapter again; read and write no cache.")]
Similar = Annotated[bool, typer.Option("--similar", help="List each adapter's nearest adapters by update cosine.")]
Top = Annotated[int, typer.Option("--top", help="How many of each adapter's highest-SSI layers to list.")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 if an adapter fails the gate or cannot be read.")]


@app.command()
@error_boundary
def scan(
    store: Store,
    fmt: Annotated[ScanFormat, FORMAT] = ScanFormat.table,
    output: Output = None,
    force: Force = False,
    workers: Workers = 1,
    ray: Ray = None,
    cache_dir: CacheDir = None,
    no_cache: NoCache = False,
    similar: Similar = False,
    neighbours: Neighbours = DEFAULT_NEIGHBOURS,
    duplicate_threshold: DuplicateThreshold = DEFAULT_DUPLICATE_THRESHOLD,
    top: Top = DEFAULT_TOP,
    strict: Strict = False,
    max_ssi: MaxSsi = None,
    max_violations: MaxViolations = None,
    baseline: Baseline = None,
    max_increase: MaxIncrease = None,
    strict_layers: StrictLayers = None,
    policy: PolicyFile = None,
    method: MethodOption = None,
    components: Components = None,
    top_h: TopH = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Score every adapter under STORE and rank them by risk (gate failures first, then by max SSI). Exit codes:
    0 the scan ran (with --strict: and every adapter passed), 1 with --strict only, 2 usage, 3 input, 4 runtime."""
    from s3lora_cli import report
    from s3lora_cli.store import ScanResult, risk_key, scan_settings, with_neighbours

    if ray is not None and workers != 1:
        raise UsageError("--ray and --workers exclude each other: Ray schedules its own workers")
    if no_cache and cache_dir is not None:
        raise UsageError("--no-cache and --cache-dir exclude each other")
    target = Target(output, force)
    target.check()
    flags = gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers, method, components, top_h)
    settings = scan_settings(flags, policy, device, top)
    if strict and settings.policy is None:
        raise UsageError("--strict needs a gate rule: --max-ssi, --baseline with --max-increase, or a policy")
    paths, cache = _paths_and_cache(store, target, None if no_cache else cache_dir, no_cache)
    stream = fmt is ScanFormat.jsonl and output is None and not similar
    rows = _scan(paths, store, settings, cache, workers, ray, quiet, stream)
    result = ScanResult(store, tuple(sorted(rows, key=risk_key)), settings, cache)
    if similar:
        result = with_neighbours(result, neighbours, duplicate_threshold)
    if not stream:
        target.render(fmt, _renderers(result, similar, target.width()))
    if not quiet:
        print_summary([f"warning: no adapters found under {store}"] if not paths else [])
        print_summary([report.scan_summary_line(result.rows, cache)])
    if strict and any(r.verdict in ("failed", "error") for r in result.rows):
        raise typer.Exit(ExitCode.GATE_FAILED)


def _paths_and_cache(
    store: Path, target: Target, cache_dir: Optional[Path], no_cache: bool
) -> tuple[list[Path], Optional[Path]]:
    """The store's adapters and the cache directory (None: no cache); the output and the cache refused if they
    lie inside an adapter."""
    from s3lora_cli.store import check_cache_dir, default_cache_dir, discover

    paths = discover(store)
    check_apart({"--output": target.path}, list(paths))
    cache = None if no_cache else (cache_dir or default_cache_dir(store))
    check_cache_dir(cache, paths)
    return paths, cache


def _scan(
    paths: list[Path],
    store: Path,
    settings: Any,
    cache: Optional[Path],
    workers: int,
    ray: Optional[str],
    quiet: bool,
    stream: bool,
) -> list[Any]:
    """The rows of the scan, each written to stdout as a JSON line as it finishes when ``stream``."""
    from s3lora_cli import report
    from s3lora_cli.store import iter_scan

    rows = []
    with _progress(quiet, len(paths)) as advance, Target().stream() as sink:
        for row in iter_scan(paths, store, settings, cache, workers, ray):
            rows.append(row)
            advance()
            if stream:
                sink.write(report.render_jsonl_line(report.scan_row_dict(row)))
                sink.flush()
    return rows


def _renderers(result: Any, similar: bool, width: int | None) -> dict[ScanFormat, Callable[[], str]]:
    from s3lora_cli import report

    return {
        ScanFormat.json: lambda: report.render_json(report.scan_dict(result, similar)),
        ScanFormat.jsonl: lambda: "".join(
            report.render_jsonl_line(report.scan_row_dict(r, similar)) for r in result.rows
        ),
        ScanFormat.table: lambda: report.render_scan_table(result, similar, width),
    }


@contextmanager
def _progress(quiet: bool, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar of adapters on stderr; yields the function to call after each one."""
    if quiet or total == 0 or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=stderr_console(), transient=True)
    with bar:
        task = bar.add_task("", total=total)
        yield lambda: bar.advance(task)
