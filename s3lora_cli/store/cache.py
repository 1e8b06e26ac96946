"""The score cache of a store: one JSON entry per adapter, keyed by everything its score depends on, written
atomically; a missing or damaged entry is a miss. Nothing is ever written into an adapter."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import fields
from pathlib import Path
from typing import Any

from s3lora_cli._version import __version__
from s3lora_cli.adapters import open_adapter
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.document import cache_dict, report_from_dict
from s3lora_cli.durable import write_text_atomic
from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import ScoreOptions, ScoreReport, score_adapter
from s3lora_cli.spectral import EPS_NORM, EPS_SSI
from s3lora_cli.store.discovery import inside

CACHE_DIR_NAME = ".s3lora-cache"
CACHE_FORMAT = 1


def default_cache_dir(root: Path) -> Path | None:
    """``<store>/.s3lora-cache``; None (no cache) when the store is one weights file, whose directory is the
    adapter's own: nothing is ever written into an adapter."""
    root = Path(root)
    return root / CACHE_DIR_NAME if root.is_dir() else None


def check_cache_dir(cache_dir: str | Path | None, adapters: Sequence[Path]) -> None:
    """Refuse a cache directory inside an adapter's directory (for a weights file with its config beside it, the
    file's directory): nothing is ever written into an adapter."""
    if cache_dir is None:
        return
    for adapter in adapters:
        directory = adapter if adapter.is_dir() else None
        if directory is None and (adapter.parent / CONFIG_NAME).is_file():
            directory = adapter.parent
        if directory is not None and inside(Path(cache_dir), directory):
            raise UsageError(
                f"--cache-dir {cache_dir} is inside the adapter {adapter}; choose a directory outside "
                "every adapter (the default is <store>/.s3lora-cache)"
            )


def cache_key(weights_sha256: str, config_raw: Mapping[str, Any], options: ScoreOptions) -> str:
    """Hex sha256 of everything a score depends on: the weights file's sha256, the config, every scoring
    option but the device, and the s3lora version."""
    params = {f.name: _plain(getattr(options, f.name)) for f in fields(options) if f.name != "device"}
    doc = {
        "cache_format": CACHE_FORMAT,
        "weights": weights_sha256,
        "config": json.dumps(config_raw, sort_keys=True, default=str),
        "options": params,
        "eps_norm": EPS_NORM,
        "eps_ssi": EPS_SSI,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """A scoring option as a JSON value: an Enum by its value, a number or None as it is, anything else as text."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def report_to_cache(report: ScoreReport) -> dict[str, Any]:
    """A ScoreReport as a cache entry (``document.cache_dict``: everything the gate uses, values exact)."""
    return cache_dict(report, CACHE_FORMAT)


def report_from_cache(doc: Mapping[str, Any], path: str, options: ScoreOptions) -> ScoreReport:
    """The ScoreReport ``report_to_cache`` stored, for the adapter now at ``path``."""
    return report_from_dict(doc, path, options)


def _entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def read_entry(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The entry stored under ``key``; None when there is none, or it is damaged or of another format."""
    try:
        doc = json.loads(_entry_path(cache_dir, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a missing or damaged entry is a miss
    return doc if isinstance(doc, dict) and doc.get("cache_format") == CACHE_FORMAT else None


def write_entry(cache_dir: Path, key: str, report: ScoreReport) -> None:
    """Write one entry atomically (temp file beside it, then rename); a cache that cannot be written is skipped."""
    target = _entry_path(cache_dir, key)
    try:
        text = json.dumps(report_to_cache(report), allow_nan=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    except (OSError, ValueError):
        pass


def score_cached(path: str | Path, options: ScoreOptions, cache_dir: str | Path | None) -> tuple[ScoreReport, bool]:
    """The adapter's ScoreReport, from the cache when an entry for its weights, config and ``options`` exists,
    else scored (and stored in the cache); returns (report, whether it came from the cache)."""
    if cache_dir is None:
        return score_adapter(path, options), False
    with closing(open_adapter(path)) as adapter:
        key = cache_key(adapter.sha256(), adapter.config.raw, options)
    doc = read_entry(Path(cache_dir), key)
    if doc is not None:
        try:
            return report_from_cache(doc, str(path), options), True
        except (KeyError, TypeError, ValueError):
            pass
    report = score_adapter(path, options)
    write_entry(Path(cache_dir), key, report)
    return report, False
