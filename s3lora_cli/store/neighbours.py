"""The nearest neighbours of adapters in a store, by the cosine of their updates (similarity.py), computed in
blocks whose factors fit a memory budget however large the store."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from s3lora_cli.adapters import open_adapter
from s3lora_cli.errors import UsageError
from s3lora_cli.store.discovery import relative
from s3lora_cli.store.results import Neighbour, ScanResult

if TYPE_CHECKING:
    from s3lora_cli.similarity import UpdateSet

DEFAULT_NEIGHBOURS = 3
DEFAULT_DUPLICATE_THRESHOLD = 0.95
FACTOR_BUDGET_BYTES = 512 << 20
GRAM_BYTES = 24
"""Per pair of ranks and module: three [r, r] float64 matrices (two Grams and their product), 8 bytes each."""

Candidate = tuple[float, str, int]
"""(cosine, path relative to the root, shared modules)"""


def load_updates(path: str | Path) -> UpdateSet:
    """The adapter's updates as float64 factors, scaling included; layers with NaN or Inf values left out."""
    import torch

    from s3lora_cli.similarity import UpdateSet

    modules = {}
    with closing(open_adapter(path)) as adapter:
        for layer in adapter.layers:
            left, right = adapter.load_factors(layer, "float64")
            if np.isfinite(left).all() and np.isfinite(right).all():
                modules[layer.module] = (torch.from_numpy(left), torch.from_numpy(right))
    return UpdateSet(modules)


def factor_size(path: Path) -> tuple[int, int]:
    """(bytes of the adapter's float64 factors, its largest rank), from the file's header."""
    with closing(open_adapter(path)) as adapter:
        size = sum(8 * lay.r * (lay.shape[0] + lay.shape[1]) for lay in adapter.layers)
        return size, max((lay.r for lay in adapter.layers), default=1)


def block_size(paths: Sequence[Path], budget_bytes: int) -> int:
    """How many adapters a block holds: two blocks of factors, and per module the Gram matrices of a block
    pair, within ``budget_bytes``."""
    sizes = [factor_size(p) for p in paths]
    largest, rank = max(b for b, _ in sizes), max(r for _, r in sizes)
    return max(1, min(budget_bytes // max(2 * largest, 1), math.isqrt(budget_bytes // GRAM_BYTES) // rank))


def nearest_neighbours(
    queries: Sequence[Path],
    keys: Sequence[Path],
    root: Path,
    k: int = DEFAULT_NEIGHBOURS,
    threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    budget_bytes: int = FACTOR_BUDGET_BYTES,
) -> dict[Path, tuple[Neighbour, ...]]:
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
    from s3lora_cli import similarity  # PyTorch, loaded when there is something to compare

    block = block_size(list({*queries, *keys}), budget_bytes)
    resolved = {p: str(Path(p).resolve()) for p in {*queries, *keys}}
    found: dict[Path, list[Candidate]] = {q: [] for q in queries}
    for i in range(0, len(queries), block):
        q_paths = list(queries[i : i + block])
        mine = {p: load_updates(p) for p in q_paths}
        for j in range(0, len(keys), block):
            k_paths = list(keys[j : j + block])
            k_sets = [mine[p] if p in mine else load_updates(p) for p in k_paths]
            sim = similarity.pairwise_similarity([mine[p] for p in q_paths], k_sets)
            cosine, shared = sim.cosine.tolist(), sim.shared.tolist()
            k_rel = [relative(Path(p), root) for p in k_paths]
            for a, q in enumerate(q_paths):
                row, me = cosine[a], resolved[q]
                found[q].extend(
                    (row[b], k_rel[b], shared[a][b])
                    for b, key in enumerate(k_paths)
                    if row[b] == row[b] and resolved[key] != me
                )  # NaN != NaN: undefined
                found[q] = _best(found[q], k, threshold)  # keep memory at O(k + duplicates) per query
    return {q: tuple(Neighbour(rel, cos, n, cos >= threshold) for cos, rel, n in found[q]) for q in queries}


def _best(candidates: list[Candidate], k: int, threshold: float) -> list[Candidate]:
    """The ``k`` most similar candidates and every further one at or above ``threshold``, most similar first."""
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [c for i, c in enumerate(candidates) if i < k or c[0] >= threshold]


def with_neighbours(
    result: ScanResult, k: int = DEFAULT_NEIGHBOURS, threshold: float = DEFAULT_DUPLICATE_THRESHOLD
) -> ScanResult:
    """The scan with each scanned adapter's nearest neighbours among the others (rows with errors: none)."""
    ok = [r for r in result.rows if r.error is None]
    paths = {r.path: (result.root / r.path if r.path != "." else result.root) for r in ok}
    found = nearest_neighbours(list(paths.values()), list(paths.values()), result.root, k, threshold)
    rows = tuple(replace(r, neighbours=found[paths[r.path]]) if r.path in paths else r for r in result.rows)
    return replace(result, rows=rows)
