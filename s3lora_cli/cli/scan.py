"""``s3lora scan``: score every adapter under a store directory (cached; in processes or on Ray), ranked by risk."""

from __future__ import annotations

import enum
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from s3lora_cli.cli import (
    BASELINE,
    COMPONENTS,
    DEVICE,
    EXIT_GATE_FAILED,
    GATE_METHOD,
    MAX_INCREASE,
    MAX_SSI,
    MAX_VIOLATIONS,
    POLICY,
    STRICT_LAYERS,
    TOP_H,
    MethodName,
    app,
    check_apart,
    check_output,
    error_boundary,
    gate_flags,
    print_summary,
    stderr_console,
    table_width,
    write_output,
)
from s3lora_cli.errors import UsageError

# The store's defaults, named in the options' help (a test keeps them equal to s3lora_cli.store's).
DEFAULT_TOP = 3
DEFAULT_NEIGHBOURS = 3
DEFAULT_DUPLICATE_THRESHOLD = 0.95

NEIGHBOURS = typer.Option(DEFAULT_NEIGHBOURS, "--neighbours", help="How many nearest adapters to list.")
DUPLICATE_THRESHOLD = typer.Option(DEFAULT_DUPLICATE_THRESHOLD, "--duplicate-threshold",
                                   help="Flag a neighbour whose update cosine is at least this.")


class ScanFormat(str, enum.Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


@app.command()
@error_boundary
def scan(
    store: Path = typer.Argument(..., metavar="STORE", help="Directory of adapters, searched recursively."),
    fmt: ScanFormat = typer.Option(ScanFormat.table, "--format", "-f", help="table, json, or jsonl (streamed)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    workers: int = typer.Option(1, "--workers", "-j", help="Local worker processes."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: auto (the running cluster), an ADDRESS "
                                      "(host:port), or local (start Ray here). Needs pip install 's3lora[ray]'."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Score cache (default <store>/.s3lora-cache)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Score every adapter again; read and write no cache."),
    similar: bool = typer.Option(False, "--similar", help="List each adapter's nearest adapters by update cosine."),
    neighbours: int = NEIGHBOURS,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    top: int = typer.Option(DEFAULT_TOP, "--top", help="How many of each adapter's highest-SSI layers to list."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if an adapter fails the gate or cannot be read."),
    max_ssi: Optional[float] = MAX_SSI,
    max_violations: Optional[int] = MAX_VIOLATIONS,
    baseline: Optional[Path] = BASELINE,
    max_increase: Optional[float] = MAX_INCREASE,
    strict_layers: Optional[bool] = STRICT_LAYERS,
    policy: Optional[Path] = POLICY,
    method: Optional[MethodName] = GATE_METHOD,
    components: Optional[int] = COMPONENTS,
    top_h: Optional[int] = TOP_H,
    device: str = DEVICE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    """Score every adapter under STORE and rank them by risk (gate failures first, then by max SSI). Exit codes:
    0 the scan ran (with --strict: and every adapter passed), 1 with --strict only, 2 usage, 3 input, 4 runtime."""
    from s3lora_cli import report
    from s3lora_cli.store import (
        ScanResult,
        check_cache_dir,
        default_cache_dir,
        discover,
        iter_scan,
        risk_key,
        scan_settings,
        with_neighbours,
    )

    if ray is not None and workers != 1:
        raise UsageError("--ray and --workers exclude each other: Ray schedules its own workers")
    if no_cache and cache_dir is not None:
        raise UsageError("--no-cache and --cache-dir exclude each other")
    check_output(output, force)
    settings = scan_settings(gate_flags(max_ssi, max_violations, baseline, max_increase, strict_layers,
                                        method and method.value, components, top_h), policy, device, top)
    if strict and settings.policy is None:
        raise UsageError("--strict needs a gate rule: --max-ssi, --baseline with --max-increase, or a policy")
    paths = discover(store)
    check_apart({"--output": output}, list(paths))
    cache = None if no_cache else (cache_dir or default_cache_dir(store))
    check_cache_dir(cache, paths)
    stream = fmt is ScanFormat.jsonl and output is None and not similar
    rows = []
    with _progress(quiet, len(paths)) as advance:
        for row in iter_scan(paths, store, settings, cache, workers, ray):
            rows.append(row)
            advance()
            if stream:
                sys.stdout.write(report.render_jsonl_line(report.scan_row_dict(row)))
                sys.stdout.flush()
    result = ScanResult(store, tuple(sorted(rows, key=risk_key)), settings, cache)
    if similar:
        result = with_neighbours(result, neighbours, duplicate_threshold)
    if not stream:
        write_output(_render(result, fmt, similar, table_width() if output is None else None), output, force)
    if not quiet:
        if not paths:
            print_summary([f"warning: no adapters found under {store}"])
        print_summary([report.scan_summary_line(result.rows, cache)])
    if strict and any(r.verdict in ("failed", "error") for r in result.rows):
        raise typer.Exit(EXIT_GATE_FAILED)


def _render(result, fmt: ScanFormat, similar: bool, width: int | None) -> str:
    from s3lora_cli import report

    if fmt is ScanFormat.json:
        return report.render_json(report.scan_dict(result, similar))
    if fmt is ScanFormat.jsonl:
        return "".join(report.render_jsonl_line(report.scan_row_dict(r, similar)) for r in result.rows)
    return report.render_scan_table(result, similar, width)


@contextmanager
def _progress(quiet: bool, total: int):
    """A progress bar of adapters on stderr; yields the function to call after each one."""
    if quiet or total == 0 or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr_console(), transient=True)
    with bar:
        task = bar.add_task("", total=total)
        yield lambda: bar.advance(task)
