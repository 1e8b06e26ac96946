"""Scanning a store: every adapter under a directory scored (through the cache, on an executor), each row with
the gate's verdict when there is a policy, the rows ranked by risk. Returns data; never prints."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from s3lora_cli.errors import S3LoraError, UsageError, one_line
from s3lora_cli.gate import Rule, evaluate, resolve_optional_policy
from s3lora_cli.scoring import ScoreReport, score_adapter, scoring_device
from s3lora_cli.store.cache import check_cache_dir, score_cached
from s3lora_cli.store.discovery import discover, relative
from s3lora_cli.store.executors import run_here, run_in_processes, run_on_ray
from s3lora_cli.store.results import DEFAULT_TOP, ScanResult, ScanRow, ScanSettings, TopLayer, risk_key


def scan_settings(
    flags: Mapping[str, Any],
    policy_file: Path | None = None,
    device: str = "auto",
    top: int = DEFAULT_TOP,
    cwd: Path | None = None,
) -> ScanSettings:
    """The scan's settings from the same flags and policy sources as ``check`` (flags over --policy over
    pyproject.toml). Unlike ``check``, a scan needs no gate rule: without max-ssi or max-increase anywhere it
    ranks by SSI only. The policy's baseline, if any, is scored here, once."""
    policy, options = resolve_optional_policy(flags, policy_file, device, cwd)
    baseline = None
    if policy is not None and policy.baseline is not None:
        baseline = score_adapter(policy.baseline, options)
    return ScanSettings(options, policy, baseline, top)


def row_of(rel: str, report: ScoreReport, settings: ScanSettings, cached: bool = False) -> ScanRow:
    """The scan row of a scored adapter: the gate applied with the settings' policy, when there is one."""
    scored = [s for s in report.layers if s.ssi is not None]
    top = tuple(TopLayer(s.module, s.ssi) for s in report.layers[: settings.top])
    passed: bool | None = None
    failing: tuple[str, ...] = ()
    over: int | None = None
    if settings.policy is not None:
        result = evaluate(report, settings.policy, settings.baseline)
        passed = result.passed
        failing = tuple(f"{v.module}: {v.message}" for v in result.failing)
        if settings.policy.max_ssi is not None:
            over = sum(1 for v in result.violations if v.rule is Rule.MAX_SSI)
    max_ssi = scored[0].ssi if scored else None
    return ScanRow(
        rel, report.adapter.sha256, len(report.layers), len(scored), max_ssi, over, top, passed, failing, cached
    )


def scan_one(path: str, root: str, settings: ScanSettings, cache_dir: str | None) -> ScanRow:
    """Scan one adapter; every problem with it becomes the row's ``error`` so that the scan goes on. Runs in the
    calling process, a worker process or a Ray task (its arguments and result are picklable)."""
    rel = relative(Path(path), Path(root))
    try:
        report, cached = score_cached(path, settings.options, cache_dir)
        return row_of(rel, report, settings, cached)
    except S3LoraError as exc:
        return ScanRow(rel, error=str(exc))
    except MemoryError:
        return ScanRow(rel, error="out of memory while scoring this adapter")
    except Exception as exc:  # an unreadable file in a shape no reader expected must not stop the scan
        return ScanRow(rel, error=f"{type(exc).__name__}: {one_line(exc)}")


def iter_scan(
    paths: Sequence[Path],
    root: str | Path,
    settings: ScanSettings,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
) -> Iterator[ScanRow]:
    """Scan ``paths`` (adapters under ``root``), yielding one ScanRow per adapter as each finishes: in order with
    one worker, in completion order with several processes (``workers``) or on Ray (``ray_address``: "auto",
    an address such as "10.0.0.1:6379", or "local" for a Ray instance started here; a Ray instance already
    initialised in this process is used as it is)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    scoring_device(settings.options)  # a bad device is one error, not one per adapter
    items = [str(p) for p in paths]
    args = (str(root), settings, None if cache_dir is None else str(cache_dir))
    if ray_address is not None:
        done = run_on_ray(scan_one, items, args, ray_address)
    elif workers == 1 or len(items) <= 1:
        done = run_here(scan_one, items, args)
    else:
        done = run_in_processes(scan_one, items, args, workers)
    with closing(done):  # interrupted, a pool stops at once rather than when the generator is collected
        for item, row, failure in done:
            yield row if row is not None else ScanRow(relative(Path(item), Path(root)), error=failure)


def scan_store(
    root: str | Path,
    settings: ScanSettings | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
) -> ScanResult:
    """Scan every adapter under ``root``; the rows ranked by risk (risk_key). ``cache_dir`` None: no cache."""
    settings = settings or ScanSettings()
    root = Path(root)
    paths = discover(root)
    check_cache_dir(cache_dir, paths)
    rows = list(iter_scan(paths, root, settings, cache_dir, workers, ray_address))
    cache = None if cache_dir is None else Path(cache_dir)
    return ScanResult(root, tuple(sorted(rows, key=risk_key)), settings, cache)
