"""How many threads this process runs: its share of the machine's cores, given to every library that keeps a
thread pool (PyTorch and its BLAS, the compiled kernels), lowered while other work keeps the cores busy.

Three rules, each measured on a shared 2-core machine (``docs/performance.md``):

- Idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``, set before PyTorch or numba start their OpenMP pools). A
  spinning thread holds a core that another process's thread needs; with two processes on two cores, or any
  other load, each parallel region then waits for a thread that cannot run, and a run took 2-5x as long.
- A process that runs beside others (``--workers``, Ray tasks, ``--jobs``) gets its share of the cores, not all
  of them (``share``).
- ``Budget`` measures, between layers, how many cores this process actually got (its own CPU time plus the
  cores left idle) and runs that many threads, at most its share: a process that finds the machine busy runs
  fewer threads instead of waiting on threads that cannot run.

Thread counts never change a result (the engine's sums are decided in an order fixed by their definition).
Nothing here imports PyTorch or numba before they are needed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set (unless the user set it) before an OpenMP runtime starts: idle threads sleep instead of spinning."""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
"""The variables that cap each library's threads; a value the user set is the most this process uses."""

MEASURE_SECONDS = 0.5
"""``Budget`` counts the cores it got over at least this long: /proc/stat ticks 100 times a second."""

JOBS_PER_CORES = 4
"""The default ``--jobs`` is one per this many cores: the passes of one layer scale to about 4 threads (they
stream the residual from memory), more cores are better used on more layers at once."""

MAX_DEFAULT_JOBS = 4
"""At most this many layers at once by default: each holds up to 256 MiB of residual, and peak memory stays
under 2 GB."""


def prepare_process() -> None:
    """Before PyTorch or numba is imported: sleeping idle threads (WAIT_POLICY), unless the user chose."""
    for name, value in WAIT_POLICY.items():
        os.environ.setdefault(name, value)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, and a cgroup (container) quota where one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def user_limit() -> int | None:
    """The smallest thread count the user set in the environment (THREAD_VARIABLES), or None."""
    values = [os.environ.get(name, "") for name in THREAD_VARIABLES]
    limits = [int(v) for v in values if v.strip().isdigit() and int(v) > 0]
    return min(limits) if limits else None


def share(parts: int) -> int:
    """The threads of each of ``parts`` processes or jobs that run at once on this process's cores."""
    limit = user_limit()
    cores = available_cores() if limit is None else min(limit, available_cores())
    return max(1, cores // max(1, parts))


def default_jobs() -> int:
    """Layers scored at once when ``--jobs`` is not given: 1 up to 7 cores, then one per JOBS_PER_CORES cores, at most
    MAX_DEFAULT_JOBS."""
    return max(1, min(MAX_DEFAULT_JOBS, available_cores() // JOBS_PER_CORES))


def set_threads(n: int) -> None:
    """Run n threads in PyTorch (and its BLAS) and in the compiled kernels, for the calling thread and the pools
    it starts (numba's count is per calling thread)."""
    import torch

    from s3lora_cli.engine import kernels

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    kernels.set_threads(n)  # nothing without numba, where the kernels are not used


def init_worker(threads: int) -> None:
    """The initializer of a worker process (or the start of a Ray task) that runs beside others: its share."""
    prepare_process()
    for name in THREAD_VARIABLES:  # the most any later budget in this process takes (``share``)
        os.environ[name] = str(threads)
    if "torch" in sys.modules or "numba" in sys.modules:  # a process that ran tasks before (Ray's workers)
        set_threads(threads)


class Budget:
    """The threads of one process (or job) that scores layer after layer: at most ``most``, and no more than the
    cores it got over the last interval (its own CPU time plus the machine's idle time, from /proc/stat)."""

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self.threads = self.most
        self._last = _sample()
        set_threads(self.threads)

    def adjust(self) -> int:
        """Called between layers: the thread count for the next one (set, if it changed)."""
        now = _sample()
        if now is None or self._last is None or now[0] - self._last[0] < MEASURE_SECONDS:
            self._last = self._last or now
            return self.threads
        seconds = now[0] - self._last[0]
        got = ((now[1] - self._last[1]) + (now[2] - self._last[2])) / seconds  # cores idle + cores used by us
        self._last = now
        threads = max(1, min(self.most, round(got)))
        if threads != self.threads:
            self.threads = threads
            set_threads(threads)
        return self.threads


def _sample() -> tuple[float, float, float] | None:
    """(monotonic seconds, machine idle CPU-seconds, this process's CPU-seconds), or None without /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = (int(fields[4]) + int(fields[5])) / ticks  # idle + iowait, summed over the CPUs
    own = time.process_time()
    return time.monotonic(), idle, own


def ordered_map(fn: Callable, items: Iterable, jobs: int, start: Callable[[], None] | None = None) -> Iterator:
    """fn(item) for each item, in order, ``jobs`` at a time in threads (the engine's work releases the GIL); at
    most ``jobs`` items are in flight, so at most that many layers are in memory. ``start`` runs first in each
    thread (its thread budget)."""
    if jobs <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=jobs, initializer=start) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= jobs:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
