"""The residual R of the greedy fit, handed out a bounded chunk of rows at a time, and the one driver of a
pass over it: every reader of R (the exact medians, the dual sums, the tangents) is a consumer fed by
``read_pass``, so that one read of each chunk serves all of them.

R = p @ q^T (p: [d, s], q: [k, s], s = r plus the picks so far) is never formed whole: the chunks are the only
place its entries exist, and at most CACHE_ENTRIES of them are kept between passes.
"""

from __future__ import annotations

from typing import Protocol

import torch

from s3lora_cli.engine import kernels

CHUNK_ENTRIES = 1 << 20
"""Entries of the residual materialised at once: bounds the working set of a pass."""

CACHE_ENTRIES = 1 << 26
"""Up to this many entries of the residual (256 MiB in float32) are formed once per step of the fit, not once
per pass: all of them for layers up to this size, the first rows of larger ones."""

KERNEL_MIN_ENTRIES = 1 << 16
"""Chunks at least this large go to the compiled CPU kernels (when numba is available): below it the call costs
more than the tensor implementation."""


class Consumer(Protocol):
    """A reader of R in a pass. ``absorbs_deflation``: its ``add`` takes what a kept chunk still owes (the previous
    pick, see ``Residual.owing_chunks``) and subtracts it itself, in the same loop as its own sums; the driver
    subtracts it before any other consumer reads the chunk."""

    absorbs_deflation: bool

    def add(self, rows: slice, chunk: torch.Tensor, owed: tuple | None = None) -> None: ...


def read_pass(res: Residual, consumers: list) -> None:
    """One pass over R, a chunk of rows at a time (every row once, in order), each chunk given to every consumer
    in turn. What a kept chunk owes is paid once, before anything reads it: by the first consumer if it
    absorbs the deflation, else here."""
    for rows, chunk, owed in res.owing_chunks():
        for consumer in consumers:
            if owed is not None and consumer.absorbs_deflation:
                consumer.add(rows, chunk, owed)
                owed = None
                continue
            if owed is not None:
                subtract(chunk, *owed)
                owed = None
            consumer.add(rows, chunk)
        if owed is not None:
            subtract(chunk, *owed)


def use_kernel(chunk: torch.Tensor) -> bool:
    """Whether a chunk goes to the compiled kernels."""
    return kernels.available and chunk.device.type == "cpu" and chunk.numel() >= KERNEL_MIN_ENTRIES


def row_chunks(n_rows: int, n_cols: int):
    """The row slices of the chunks of a [n_rows, n_cols] matrix, CHUNK_ENTRIES entries each (at least one row)."""
    step = max(1, CHUNK_ENTRIES // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def subtract(chunk: torch.Tensor, du: torch.Tensor, v: torch.Tensor) -> None:
    """chunk -= du v^T in place, the product rounded first (as ``kernels.dual_sums`` does when it deflates)."""
    chunk.sub_(du[:, None] * v[None, :])


class Residual:
    """R = p @ q^T (p: [d, s], q: [k, s]) at one step of the fit, handed out a chunk of rows at a time.

    Every pass of a step sees the same values: the first chunks, as many as fit in CACHE_ENTRIES entries (all of
    them for most layers), are kept after the first pass, and the next step's residual is made from them by
    subtracting the pick in place, each chunk just before its first use in that step (in the same loop as the
    dual sums, see ``read_pass``); the others are formed again in the same way from the factors in every pass
    (a bounded working set).
    """

    def __init__(self, p: torch.Tensor, q: torch.Tensor) -> None:
        self.p, self.q = p, q
        self._cache: list = []
        self._complete = False  # the first pass is over: the cache holds every chunk that fits
        self._owed: set = set()  # cached chunks that still owe the previous pick's subtraction
        self._pick: tuple | None = None  # (delta u, v) of the previous pick

    def chunks(self):
        """(rows, chunk) of R, every row once. A chunk that is not kept (past CACHE_ENTRIES) is valid only
        until the next one is asked for."""
        for rows, chunk, owed in self.owing_chunks():
            if owed is not None:
                subtract(chunk, *owed)
            yield rows, chunk

    def owing_chunks(self):
        """(rows, chunk, owed) as in ``chunks``, except that a cached chunk may still owe the previous pick:
        owed = (delta u[rows], v), or None; the caller subtracts it in place (``subtract``, or a kernel that
        does the same in its own loop, bit for bit) before anything reads the chunk."""
        all_rows = list(row_chunks(self.p.shape[0], self.q.shape[0]))
        if self._complete:
            yield from self._kept_chunks()
            scratch = None
            for rows in all_rows[len(self._cache) :]:
                scratch = self._form(rows, scratch)
                yield rows, scratch, None
            return
        self._cache, caching, room, scratch = [], True, CACHE_ENTRIES, None
        for rows in all_rows:
            n = (rows.stop - rows.start) * self.q.shape[0]
            caching = caching and n <= room
            if caching:
                self._cache.append((rows, self._form(rows)))
                room -= n
                yield *self._cache[-1], None
            else:
                scratch = self._form(rows, scratch)
                yield rows, scratch, None
        self._complete = True

    def _kept_chunks(self):
        for index, (rows, chunk) in enumerate(self._cache):
            owed = None
            if index in self._owed:
                self._owed.discard(index)
                owed = (self._pick[0][rows], self._pick[1])
            yield rows, chunk, owed

    def _form(self, rows: slice, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """R[rows] from the factors; a chunk that is not kept is formed in ``scratch`` (the previous one's
        memory, so that a pass does not allocate per chunk): it is valid until the next one is asked for."""
        if scratch is None:
            return self.p[rows] @ self.q.T
        out = scratch.view(-1)[: (rows.stop - rows.start) * self.q.shape[0]].view(-1, self.q.shape[0])
        return torch.matmul(self.p[rows], self.q.T, out=out)

    def deflate(self, delta: float, u: torch.Tensor, v: torch.Tensor) -> Residual:
        """The next step's residual, R - delta u v^T (u: [d], v: [k]); this one is used up. The kept chunks are
        handed on, each owing this pick (and the previous one, if no pass of this step read it)."""
        following = Residual(torch.cat([self.p, -delta * u[:, None]], dim=1), torch.cat([self.q, v[:, None]], dim=1))
        if self._complete:
            for index in self._owed:
                rows, chunk = self._cache[index]
                assert self._pick is not None  # a chunk owes only a pick that was made
                subtract(chunk, self._pick[0][rows], self._pick[1])
            following._cache, following._complete = self._cache, True
            following._owed, following._pick = set(range(len(self._cache))), (delta * u, v)
            self._cache, self._complete, self._owed = [], False, set()
        return following
