"""Adapter stores: scanning every adapter under a directory (locally, in processes or on Ray) with a result cache,
the nearest neighbours of adapters by the similarity of their updates, and admitting an adapter through the gate
into the store (or its quarantine) under a lock, with an audit log. Returns data; never prints."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from s3lora_cli import __version__, durable
from s3lora_cli.adapters import LayerKind, LoraLayer, SkippedTensor, find_adapters, open_adapter
from s3lora_cli.adapters.base import file_sha256
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.adapters.detect import check_confined
from s3lora_cli.adapters.files import PlannedFile, copy_planned, plan_copy
from s3lora_cli.durable import write_text_atomic
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError, describe_os_error
from s3lora_cli.gate import (
    SETTINGS,
    GatePolicy,
    GateResult,
    Rule,
    check_adapters,
    evaluate,
    find_pyproject,
    load_policy_file,
    resolve_policy,
)
from s3lora_cli.scoring import (
    AdapterInfo,
    LayerScore,
    ScoreOptions,
    ScoreReport,
    rank_key,
    resolve_device,
    score_adapter,
)
from s3lora_cli.similarity import UpdateSet, pairwise_similarity
from s3lora_cli.spectral import EPS_NORM, EPS_SSI, Method

CACHE_DIR_NAME = ".s3lora-cache"
LOCK_NAME = ".s3lora.lock"
AUDIT_LOG_NAME = ".s3lora-audit.jsonl"
QUARANTINE_SUFFIX = ".quarantine"
ADMIT_RECORD_NAME = "s3lora-admit.json"
REPORT_NAME = "s3lora-report.json"
CACHE_FORMAT = 1
DEFAULT_TOP = 3
DEFAULT_NEIGHBOURS = 3
DEFAULT_DUPLICATE_THRESHOLD = 0.95
DEFAULT_LOCK_TIMEOUT = 600.0
FACTOR_BUDGET_BYTES = 512 << 20
RULE_KEYS = ("max-ssi", "max-increase", "baseline")


# --- values -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanSettings:
    """How a store is scanned.

    options: how each adapter is scored (the cache key includes them, except the device).
    policy: the gate applied to each adapter, or None (then no verdict and no over-threshold count).
    baseline: the policy's baseline, scored once before the scan (None without one).
    top: how many of each adapter's highest-SSI layers a row lists.
    """

    options: ScoreOptions = ScoreOptions()
    policy: GatePolicy | None = None
    baseline: ScoreReport | None = None
    top: int = DEFAULT_TOP

    def __post_init__(self) -> None:
        if self.top < 0:
            raise UsageError(f"--top must be at least 0, got {self.top}")


@dataclass(frozen=True)
class TopLayer:
    module: str
    ssi: float | None


@dataclass(frozen=True)
class Neighbour:
    """Another adapter of the store and the similarity of its update to this one's (see similarity.py).

    cosine: the norm-weighted mean cosine over shared modules, in [-1, 1]. shared_modules: how many modules
    (same path, same dW shape) were compared. duplicate: cosine >= the duplicate threshold."""

    path: str
    cosine: float
    shared_modules: int
    duplicate: bool


@dataclass(frozen=True)
class ScanRow:
    """One adapter of a scanned store.

    path: relative to the store root (POSIX separators; "." for the root itself). sha256: of the weights file.
    layers / scored: LoRA layers found / scored (NaN or Inf layers are not). max_ssi: the highest SSI.
    over_threshold: layers with SSI above the policy's max-ssi (None without one). top_layers: the highest-SSI
    layers, highest first. passed: the gate's verdict (None without a policy). failing: "module: message" for
    each layer that failed the gate. cached: the scores came from the cache. error: why the adapter could not
    be scanned (the other fields are then empty). neighbours: with --similar, its nearest adapters.
    """

    path: str
    sha256: str | None = None
    layers: int = 0
    scored: int = 0
    max_ssi: float | None = None
    over_threshold: int | None = None
    top_layers: tuple[TopLayer, ...] = ()
    passed: bool | None = None
    failing: tuple[str, ...] = ()
    cached: bool = False
    error: str | None = None
    neighbours: tuple[Neighbour, ...] = ()

    @property
    def verdict(self) -> str:
        """'error', 'failed', 'passed', or 'scored' (no policy)."""
        if self.error is not None:
            return "error"
        if self.passed is None:
            return "scored"
        return "passed" if self.passed else "failed"


def risk_key(row: ScanRow) -> tuple:
    """Rank rows by risk: gate failures first, then by max SSI (highest first), then by path; rows that could
    not be scanned last."""
    return (row.error is not None, row.passed is not False,
            -(row.max_ssi if row.max_ssi is not None else -1.0), row.path)


@dataclass(frozen=True)
class ScanResult:
    """A scanned store: its rows ranked by risk_key, and the cache directory used (None: no cache)."""

    root: Path
    rows: tuple[ScanRow, ...]
    settings: ScanSettings
    cache_dir: Path | None


# --- settings ---------------------------------------------------------------------------------------------

def scan_settings(flags: Mapping[str, Any], policy_file: Path | None = None, device: str = "auto",
                  top: int = DEFAULT_TOP, cwd: Path | None = None) -> ScanSettings:
    """The scan's settings from the same flags and policy sources as ``check`` (flags over --policy over
    pyproject.toml). Unlike ``check``, a scan needs no gate rule: without max-ssi or max-increase anywhere it
    ranks by SSI only. The policy's baseline, if any, is scored here, once."""
    source = policy_file if policy_file is not None else find_pyproject(cwd or Path.cwd())
    from_file = load_policy_file(source) if source is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    if any(k in given or k in from_file for k in RULE_KEYS):
        policy = resolve_policy(flags, policy_file, cwd)
        options = policy.score_options(device)
        baseline = score_adapter(policy.baseline, options) if policy.baseline is not None else None
        return ScanSettings(options, policy, baseline, top)
    merged = {**from_file, **{k: SETTINGS[k](v, f"--{k}") for k, v in given.items()}}
    options = ScoreOptions(method=merged.get("method", Method.MAS_SVD), components=merged.get("components"),
                           top_h=merged.get("top-h"), device=device)
    return ScanSettings(options, None, None, top)


# --- discovery --------------------------------------------------------------------------------------------

def discover(root: str | Path) -> list[Path]:
    """Every adapter under ``root``, sorted by path; hidden directories (the cache, temporary directories of an
    interrupted admit) are skipped."""
    root = Path(root)
    if not root.exists():
        raise AdapterInputError(f"{root}: no such file or directory")
    found = []
    for path in find_adapters(root):
        rel = _relative(path, root)
        if not any(part.startswith(".") and part not in (".", "..") for part in Path(rel).parts):
            found.append(path)
    return found


def _relative(path: Path, root: Path) -> str:
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return Path(path).as_posix()
    return rel.as_posix() if rel.parts else "."


def default_cache_dir(root: Path) -> Path | None:
    """``<store>/.s3lora-cache``; None (no cache) when the store is one weights file, whose directory is the
    adapter's own: nothing is ever written into an adapter."""
    root = Path(root)
    return root / CACHE_DIR_NAME if root.is_dir() else None


# --- the cache --------------------------------------------------------------------------------------------

def check_cache_dir(cache_dir: str | Path | None, adapters: Sequence[Path]) -> None:
    """Refuse a cache directory inside an adapter's directory (for a weights file with its config beside it, the
    file's directory): nothing is ever written into an adapter."""
    if cache_dir is None:
        return
    for adapter in adapters:
        directory = adapter if adapter.is_dir() else None
        if directory is None and (adapter.parent / CONFIG_NAME).is_file():
            directory = adapter.parent
        if directory is not None and _inside(Path(cache_dir), directory):
            raise UsageError(f"--cache-dir {cache_dir} is inside the adapter {adapter}; choose a directory outside "
                             "every adapter (the default is <store>/.s3lora-cache)")


def cache_key(weights_sha256: str, config_raw: Mapping[str, Any], options: ScoreOptions) -> str:
    """Hex sha256 of everything a score depends on: the weights file's sha256, the config, every scoring
    option but the device, and the s3lora version."""
    params = {f.name: _plain(getattr(options, f.name)) for f in fields(options) if f.name != "device"}
    doc = {"cache_format": CACHE_FORMAT, "weights": weights_sha256,
           "config": json.dumps(config_raw, sort_keys=True, default=str), "options": params,
           "eps_norm": EPS_NORM, "eps_ssi": EPS_SSI, "version": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """A scoring option as a JSON value: an Enum by its value, a number or None as it is, anything else as text."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def report_to_cache(report: ScoreReport) -> dict[str, Any]:
    """A ScoreReport as a JSON-able document (everything the gate uses; the L1 fit's picks are left out)."""
    def layer(s: LayerScore) -> dict[str, Any]:
        lay = s.layer
        return {"module": lay.module, "kind": lay.kind.value, "shape": list(lay.shape), "r": lay.r,
                "lora_alpha": lay.lora_alpha, "scaling": lay.scaling, "dtype": lay.dtype, "keys": lay.keys,
                "layer_notes": list(lay.notes), "groups": lay.groups, "ssi": s.ssi, "sigma": list(s.sigma),
                "components": s.components, "top_h": s.top_h, "notes": list(s.notes), "error": s.error}

    a = report.adapter
    return {"cache_format": CACHE_FORMAT, "tool_version": report.tool_version, "device": report.device,
            "parameters": report.parameters,
            "adapter": {"weights_file": a.weights_file, "sha256": a.sha256, "format": a.format,
                        "base_model_name_or_path": a.base_model_name_or_path, "peft_type": a.peft_type, "r": a.r,
                        "lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora, "use_dora": a.use_dora,
                        "target_modules": a.target_modules},
            "layers": [layer(s) for s in report.layers],
            "not_analysed": [{"key": t.key, "module": t.module, "reason": t.reason, "shape": list(t.shape)}
                             for t in report.not_analysed]}


def report_from_cache(doc: Mapping[str, Any], path: str, options: ScoreOptions) -> ScoreReport:
    """The ScoreReport ``report_to_cache`` stored, for the adapter now at ``path``."""
    layers = []
    for d in doc["layers"]:
        lay = LoraLayer(d["module"], LayerKind(d["kind"]), tuple(d["shape"]), d["r"], d["lora_alpha"], d["scaling"],
                        d["dtype"], dict(d["keys"]), tuple(d["layer_notes"]), d["groups"])
        layers.append(LayerScore(lay, d["ssi"], tuple(d["sigma"]), d["components"], d["top_h"],
                                 notes=tuple(d["notes"]), error=d["error"]))
    a = doc["adapter"]
    info = AdapterInfo(path, a["weights_file"], a["sha256"], a["format"], a["base_model_name_or_path"],
                       a["peft_type"], a["r"], a["lora_alpha"], a["use_rslora"], a["use_dora"], a["target_modules"])
    skipped = tuple(SkippedTensor(t["key"], t["module"], t["reason"], tuple(t["shape"])) for t in doc["not_analysed"])
    return ScoreReport(info, options, doc["device"], tuple(sorted(layers, key=rank_key)), skipped,
                       tool_version=doc["tool_version"], parameters=dict(doc["parameters"]))


def _read_cache(cache_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(_cache_path(cache_dir, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a missing or damaged entry is a miss
    return doc if isinstance(doc, dict) and doc.get("cache_format") == CACHE_FORMAT else None


def _write_cache(cache_dir: Path, key: str, report: ScoreReport) -> None:
    """Write one entry atomically (temp file beside it, then rename); a cache that cannot be written is skipped."""
    target = _cache_path(cache_dir, key)
    try:
        text = json.dumps(report_to_cache(report), allow_nan=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    except (OSError, ValueError):
        pass


# --- scanning ---------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def score_cached(path: str | Path, options: ScoreOptions, cache_dir: str | Path | None) -> tuple[ScoreReport, bool]:
    """The adapter's ScoreReport, from the cache when an entry for its weights, config and ``options`` exists,
    else scored (and stored in the cache); returns (report, whether it came from the cache)."""
    if cache_dir is None:
        return score_adapter(path, options), False
    with closing(open_adapter(path)) as adapter:
        key = cache_key(adapter.sha256(), adapter.config.raw, options)
    doc = _read_cache(Path(cache_dir), key)
    if doc is not None:
        try:
            return report_from_cache(doc, str(path), options), True
        except (KeyError, TypeError, ValueError):
            pass
    report = score_adapter(path, options)
    _write_cache(Path(cache_dir), key, report)
    return report, False


def row_of(rel: str, report: ScoreReport, settings: ScanSettings, cached: bool = False) -> ScanRow:
    """The scan row of a scored adapter: the gate applied with the settings' policy, when there is one."""
    scored = [s for s in report.layers if s.ssi is not None]
    top = tuple(TopLayer(s.module, s.ssi) for s in report.layers[:settings.top])
    passed, failing, over = None, (), None
    if settings.policy is not None:
        result = evaluate(report, settings.policy, settings.baseline)
        passed = result.passed
        failing = tuple(f"{v.module}: {v.message}" for v in result.failing)
        if settings.policy.max_ssi is not None:
            over = sum(1 for v in result.violations if v.rule is Rule.MAX_SSI)
    return ScanRow(rel, report.adapter.sha256, len(report.layers), len(scored), scored[0].ssi if scored else None,
                   over, top, passed, failing, cached)


def scan_one(path: str, root: str, settings: ScanSettings, cache_dir: str | None) -> ScanRow:
    """Scan one adapter; every problem with it becomes the row's ``error`` so that the scan goes on. Runs in the
    calling process, a worker process or a Ray task (its arguments and result are picklable)."""
    rel = _relative(Path(path), Path(root))
    try:
        report, cached = score_cached(path, settings.options, cache_dir)
        return row_of(rel, report, settings, cached)
    except S3LoraError as exc:
        return ScanRow(rel, error=str(exc))
    except MemoryError:
        return ScanRow(rel, error="out of memory while scoring this adapter")
    except Exception as exc:  # an unreadable file in a shape no reader expected must not stop the scan
        return ScanRow(rel, error=f"{type(exc).__name__}: {_one_line(exc)}")


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: no oversubscription


def iter_scan(paths: Sequence[Path], root: str | Path, settings: ScanSettings, cache_dir: str | Path | None = None,
              workers: int = 1, ray_address: str | None = None) -> Iterator[ScanRow]:
    """Scan ``paths`` (adapters under ``root``), yielding one ScanRow per adapter as each finishes: in order with
    one worker, in completion order with several processes (``workers``) or on Ray (``ray_address``: "auto",
    an address such as "10.0.0.1:6379", or "local" for a Ray instance started here; a Ray instance already
    initialised in this process is used as it is)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    resolve_device(settings.options.device)  # a bad device is one error, not one per adapter
    cache = None if cache_dir is None else str(cache_dir)
    items = [str(p) for p in paths]
    if ray_address is not None:
        yield from _ray_scan(items, str(root), settings, cache, ray_address)
    elif workers == 1 or len(items) <= 1:
        for path in items:
            yield scan_one(path, str(root), settings, cache)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(scan_one, path, str(root), settings, cache): path for path in items}
            try:
                for future in as_completed(futures):
                    try:
                        yield future.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        yield ScanRow(_relative(Path(futures[future]), Path(root)),
                                      error=f"worker failed: {type(exc).__name__}: {_one_line(exc)}")
            except BaseException:  # interrupted (SIGINT, SIGTERM): wait only for the adapters being scored
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _ray_scan(items: list[str], root: str, settings: ScanSettings, cache: str | None,
              address: str) -> Iterator[ScanRow]:
    try:
        import ray
    except ImportError:
        raise RuntimeProblem("--ray needs Ray, which is not installed: pip install 's3lora[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as exc:
            raise RuntimeProblem(
                f"cannot connect to a Ray cluster at {address!r}: {_one_line(exc)}; start one with "
                "`ray start --head` (or pass --ray local for a Ray instance on this machine)") from None
        started = True
    try:
        task = ray.remote(num_cpus=1)(scan_one)
        shared = ray.put(settings)
        pending = {task.remote(path, root, shared, cache): path for path in items}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            more, _ = ray.wait([r for r in pending if r not in done], num_returns=max(len(pending) - 1, 1),
                               timeout=0) if len(pending) > 1 else ([], [])
            for ref in [*done, *more]:
                path = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # the task's worker died
                    yield ScanRow(_relative(Path(path), Path(root)),
                                  error=f"Ray task failed: {type(exc).__name__}: {_one_line(exc)}")
    finally:
        if started:
            ray.shutdown()


def scan_store(root: str | Path, settings: ScanSettings | None = None, cache_dir: str | Path | None = None,
               workers: int = 1, ray_address: str | None = None) -> ScanResult:
    """Scan every adapter under ``root``; the rows ranked by risk (risk_key). ``cache_dir`` None: no cache."""
    settings = settings or ScanSettings()
    root = Path(root)
    paths = discover(root)
    check_cache_dir(cache_dir, paths)
    rows = list(iter_scan(paths, root, settings, cache_dir, workers, ray_address))
    return ScanResult(root, tuple(sorted(rows, key=risk_key)), settings,
                      None if cache_dir is None else Path(cache_dir))


# --- neighbours -------------------------------------------------------------------------------------------

def load_updates(path: str | Path) -> UpdateSet:
    """The adapter's updates as float64 factors, scaling included; layers with NaN or Inf values left out."""
    modules = {}
    with closing(open_adapter(path)) as adapter:
        for layer in adapter.layers:
            left, right = adapter.load_factors(layer, torch.float64, torch.device("cpu"))
            if bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all()):
                modules[layer.module] = (left, right)
    return UpdateSet(modules)


def _factor_size(path: Path) -> tuple[int, int]:
    """(bytes of the adapter's float64 factors, its largest rank), from the file's header."""
    with closing(open_adapter(path)) as adapter:
        return (sum(8 * lay.r * (lay.shape[0] + lay.shape[1]) for lay in adapter.layers),
                max((lay.r for lay in adapter.layers), default=1))


def nearest_neighbours(queries: Sequence[Path], keys: Sequence[Path], root: Path, k: int = DEFAULT_NEIGHBOURS,
                       threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
                       budget_bytes: int = FACTOR_BUDGET_BYTES) -> dict[Path, tuple[Neighbour, ...]]:
    """For each query adapter, its ``k`` most similar key adapters plus every further one at or above
    ``threshold`` (never itself, never an undefined similarity), most similar first; key paths are given
    relative to ``root``. Adapters are loaded in blocks whose float64 factors, and whose per-module Gram
    matrices, fit ``budget_bytes``, so memory stays bounded however large the store; a key block is re-read
    for each query block."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--duplicate-threshold must be between -1 and 1, got {threshold}")
    if k < 0:
        raise UsageError(f"--neighbours must be at least 0, got {k}")
    if not queries or not keys:
        return {q: () for q in queries}
    sizes = [_factor_size(p) for p in {*queries, *keys}]
    largest, rank = max(b for b, _ in sizes), max(r for _, r in sizes)
    # two blocks of factors, and per module three [block r, block r] float64 matrices (two Grams, their product)
    block = max(1, min(budget_bytes // max(2 * largest, 1), math.isqrt(budget_bytes // 24) // rank))
    q_blocks = [list(queries[i:i + block]) for i in range(0, len(queries), block)]
    k_blocks = [list(keys[i:i + block]) for i in range(0, len(keys), block)]
    resolved = {p: str(Path(p).resolve()) for p in {*queries, *keys}}
    found: dict[Path, list[tuple[float, str, int]]] = {q: [] for q in queries}

    def best(candidates: list[tuple[float, str, int]]) -> list[tuple[float, str, int]]:
        candidates.sort(key=lambda c: (-c[0], c[1]))
        return [c for i, c in enumerate(candidates) if i < k or c[0] >= threshold]

    for q_paths in q_blocks:
        mine = {p: load_updates(p) for p in q_paths}
        q_sets = [mine[p] for p in q_paths]
        for k_paths in k_blocks:
            k_sets = [mine[p] if p in mine else load_updates(p) for p in k_paths]
            sim = pairwise_similarity(q_sets, k_sets)
            cosine, shared = sim.cosine.tolist(), sim.shared.tolist()
            k_rel = [_relative(Path(p), root) for p in k_paths]
            for i, q in enumerate(q_paths):
                row, row_shared, me = cosine[i], shared[i], resolved[q]
                candidates = found[q]
                candidates.extend((row[j], k_rel[j], row_shared[j]) for j, key in enumerate(k_paths)
                                  if row[j] == row[j] and resolved[key] != me)  # NaN != NaN: undefined
                found[q] = best(candidates)  # keep memory at O(k + duplicates) per query
    return {q: tuple(Neighbour(rel, cos, n, cos >= threshold) for cos, rel, n in found[q]) for q in queries}


def with_neighbours(result: ScanResult, k: int = DEFAULT_NEIGHBOURS,
                    threshold: float = DEFAULT_DUPLICATE_THRESHOLD) -> ScanResult:
    """The scan with each scanned adapter's nearest neighbours among the others (rows with errors: none)."""
    ok = [r for r in result.rows if r.error is None]
    paths = {r.path: (result.root / r.path if r.path != "." else result.root) for r in ok}
    found = nearest_neighbours(list(paths.values()), list(paths.values()), result.root, k, threshold)
    rows = tuple(replace(r, neighbours=found[paths[r.path]]) if r.path in paths else r for r in result.rows)
    return replace(result, rows=rows)


# --- admitting --------------------------------------------------------------------------------------------

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


def _inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def clean_stale(directory: Path) -> list[Path]:
    """Remove the temporary directories killed admits left in ``directory`` (those of live processes, here or on
    another machine, stay). Returns what was removed."""
    return durable.clean_stale(Path(directory))


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


def _copy_adapter(candidate: Path, weights: Path, config: Path | None, into: Path, entry: str, key: str,
                  extra_files: Mapping[str, str]) -> Path:
    """Copy the adapter into a fresh temporary directory inside ``into`` (only regular files inside the adapter
    directory, ``files.plan_copy``), check that the copy has the content key the gate scored, add
    ``extra_files``, and return the temporary directory (renamed into place by the caller)."""
    if candidate.is_dir():
        rel_weights = weights.resolve().relative_to(candidate.resolve()).as_posix()
        planned = plan_copy(candidate, exempt={rel_weights.split("/")[0], CONFIG_NAME})
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
        if entry_key(file_sha256(tmp / rel_weights), _config_sha256(copied_config)) != key:
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


class _Appended:
    """One record appended to the audit log and fsynced, which can still be taken back (``undo``) until the
    admission it records is in place: the log holds whole lines only, and only of decisions that took effect."""

    def __init__(self, log: Path, record: Mapping[str, Any]) -> None:
        data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        self.warning: str | None = None
        self._fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._size = os.fstat(self._fd).st_size
            if self._size and os.pread(self._fd, 1, self._size - 1) != b"\n":
                self.warning = (f"{log}: its last line is incomplete (a write was cut short); it is left as it is, "
                                "readers skip it, and the new record starts on a line of its own")
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


@contextmanager
def _locked(store: Path, timeout: float) -> Iterator[None]:
    """Hold the store's lock file (``filelock``: fcntl on POSIX, msvcrt on Windows)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(store / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeProblem(f"the store {store} stayed locked by another admit for {timeout:g} s; "
                             "try again") from None
    try:
        yield
    finally:
        lock.release()


def _readable_members(store: Path) -> tuple[list[Path], list[str]]:
    """The store's adapters that can be opened, and a one-line reason for each one that cannot."""
    good, broken = [], []
    for member in discover(store):
        try:
            _factor_size(member)
        except (S3LoraError, OSError) as exc:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else _one_line(exc)
            broken.append(f"{_relative(member, store)}: {reason}")
            continue
        good.append(member)
    return good, broken


def admit_adapter(candidate: str | Path, store: str | Path, policy: GatePolicy, *, device: str = "auto",
                  name: str | None = None, quarantine: str | Path | None = None, audit_log: str | Path | None = None,
                  neighbours: int = DEFAULT_NEIGHBOURS, duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
                  report_json: Callable[[GateResult], str] | None = None,
                  clock: Callable[[], datetime] | None = None,
                  lock_timeout: float = DEFAULT_LOCK_TIMEOUT, refusal: str | None = None) -> AdmitResult:
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
    if store.exists() and not store.is_dir():
        raise UsageError(f"--store {store} is not a directory")
    if not candidate.exists():
        raise AdapterInputError(f"{candidate}: no such file or directory")
    if _inside(candidate, store) or _inside(store, candidate):
        raise UsageError(f"{candidate} and the store {store} overlap; admit an adapter from outside the store")
    if name is not None and (not name or name.startswith(".") or "/" in name or "\\" in name):
        raise UsageError(f"--name {name!r}: expected a plain directory name, not starting with '.'")
    if neighbours < 0:
        raise UsageError(f"--neighbours must be at least 0, got {neighbours}")
    quarantine = Path(quarantine) if quarantine is not None else quarantine_dir(store)
    audit = Path(audit_log) if audit_log is not None else store / AUDIT_LOG_NAME
    home = candidate if candidate.is_dir() else candidate.parent
    for option, path in (("--quarantine", quarantine), ("--audit-log", audit)):
        if _inside(path, home) or (candidate.is_dir() and _inside(candidate, path)):
            raise UsageError(f"{option} {path} overlaps the adapter {candidate}; nothing is ever written into an "
                             "input: choose a path outside it")
    before = _config_sha256(_config_file(candidate, candidate))
    gate = check_adapters([candidate], policy, device)[0]
    sha = gate.report.adapter.sha256
    weights = Path(gate.report.adapter.weights_file)
    config = _config_file(candidate, weights)
    config_sha = _config_sha256(config)
    if config_sha != before:
        raise AdapterInputError(f"{config} changed while it was being admitted; run admit again")
    key = entry_key(sha, config_sha)
    base = name or home.resolve().name or "adapter"
    entry_name = f"{base}-{key[:12]}"
    store.mkdir(parents=True, exist_ok=True)
    members, broken = _readable_members(store)
    notes = [f"{store}/{b}; left out of the neighbours" for b in broken]
    try:
        near = nearest_neighbours([candidate], members, store, neighbours, duplicate_threshold)[candidate]
    except S3LoraError as exc:
        near = ()
        notes.append(f"the store's neighbours could not be computed ({_one_line(exc)})")
    passed = gate.passed and refusal is None
    into = store if passed else quarantine
    into.mkdir(parents=True, exist_ok=True)
    destination = into / entry_name
    now = (clock or (lambda: datetime.now(timezone.utc)))()
    record: dict[str, Any] = {
        "time": now.isoformat(), "adapter": str(candidate.resolve()), "name": entry_name, "sha256": sha,
        "key": key, "verdict": "admitted" if passed else "refused", "already_present": False,
        "destination": str(destination.resolve()),
        "reasons": [refusal] * (refusal is not None) + [f"{v.module}: {v.message}" for v in gate.failing],
        "rules": [{"rule": o.rule.value, "limit": o.limit, "allowed": o.allowed, "violations": o.violations,
                   "passed": o.passed} for o in gate.rules],
        "duplicates": [{"path": n.path, "cosine": round(n.cosine, 6)} for n in near if n.duplicate],
        "tool_version": __version__,
    }
    with _locked(store, lock_timeout):
        for directory in {store, into}:
            clean_stale(directory)
        present = _find_entry(into, key)
        if present is None and os.path.lexists(destination):
            raise UsageError(f"{destination} exists with other content; remove it or pass --name")
        tmp = None
        committed = False
        try:
            if present is not None:
                destination = present
                record.update(already_present=True, name=present.name, destination=str(present.resolve()))
            else:
                extra = {} if passed else {ADMIT_RECORD_NAME: json.dumps(record, allow_nan=False, indent=2)
                                                + "\n"}
                if not passed and report_json is not None:
                    extra[REPORT_NAME] = report_json(gate)
                tmp = _copy_adapter(candidate, weights, config, into, entry_name, key, extra)
            audit.parent.mkdir(parents=True, exist_ok=True)
            with durable.deferred_signals():
                appended = _Appended(audit, record)
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
            if committed and isinstance(exc, KeyboardInterrupt):
                done = "admitted into" if passed else "quarantined in"
                raise type(exc)(f"interrupted after {candidate} was {done} {destination} and logged") from None
            if isinstance(exc, OSError):
                done = "admitted" if passed else "quarantined"
                raise RuntimeProblem(f"cannot write the decision: {describe_os_error(exc)}; {candidate} was not "
                                     f"{done}, nothing was written") from None
            raise
    if appended.warning:
        notes.insert(0, appended.warning)
    return AdmitResult(gate, passed, record["name"], sha, destination, record["already_present"], near,
                       audit, record, key, tuple(broken), tuple(notes))


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


__all__ = ["AdmitResult", "Neighbour", "ScanResult", "ScanRow", "ScanSettings", "TopLayer", "admit_adapter",
           "discover", "iter_scan", "nearest_neighbours", "scan_settings", "scan_store", "with_neighbours"]
