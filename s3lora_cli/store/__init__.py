"""Adapter stores: scanning every adapter under a directory (``scan``: locally, in processes or on Ray, through
the score ``cache``), the nearest ``neighbours`` of adapters by the similarity of their updates, and admitting an
adapter through the gate into the store or its quarantine (``admission``) with an ``audit_log``. Returns data;
never prints. Every public name of the subpackage is importable from here."""

from s3lora_cli.gate import RULE_KEYS
from s3lora_cli.store.admission import (
    ADMIT_RECORD_NAME,
    DEFAULT_LOCK_TIMEOUT,
    LOCK_NAME,
    QUARANTINE_SUFFIX,
    REPORT_NAME,
    AdmitResult,
    admit_adapter,
    clean_stale,
    entry_key,
    quarantine_dir,
)
from s3lora_cli.store.audit_log import AUDIT_LOG_NAME, read_audit_log
from s3lora_cli.store.cache import (
    CACHE_DIR_NAME,
    CACHE_FORMAT,
    cache_key,
    check_cache_dir,
    default_cache_dir,
    report_from_cache,
    report_to_cache,
    score_cached,
)
from s3lora_cli.store.discovery import discover
from s3lora_cli.store.neighbours import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_NEIGHBOURS,
    FACTOR_BUDGET_BYTES,
    load_updates,
    nearest_neighbours,
    with_neighbours,
)
from s3lora_cli.store.results import DEFAULT_TOP, Neighbour, ScanResult, ScanRow, ScanSettings, TopLayer, risk_key
from s3lora_cli.store.scan import iter_scan, row_of, scan_one, scan_settings, scan_store

__all__ = [
    "ADMIT_RECORD_NAME",
    "AUDIT_LOG_NAME",
    "CACHE_DIR_NAME",
    "CACHE_FORMAT",
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_NEIGHBOURS",
    "DEFAULT_TOP",
    "FACTOR_BUDGET_BYTES",
    "LOCK_NAME",
    "QUARANTINE_SUFFIX",
    "REPORT_NAME",
    "RULE_KEYS",
    "AdmitResult",
    "Neighbour",
    "ScanResult",
    "ScanRow",
    "ScanSettings",
    "TopLayer",
    "admit_adapter",
    "cache_key",
    "check_cache_dir",
    "clean_stale",
    "default_cache_dir",
    "discover",
    "entry_key",
    "iter_scan",
    "load_updates",
    "nearest_neighbours",
    "quarantine_dir",
    "read_audit_log",
    "report_from_cache",
    "report_to_cache",
    "risk_key",
    "row_of",
    "scan_one",
    "score_cached",
    "scan_settings",
    "scan_store",
    "with_neighbours",
]
