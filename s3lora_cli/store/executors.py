"""Where a store's adapters are scanned: in this process, in local worker processes, or as Ray tasks. Each
executor runs ``task(item, *args)`` for every item (the task and its arguments picklable) and yields
``(item, result, failure)`` as each finishes: ``failure`` is None, or one line on why the worker running the
task died (killed, out of memory), when there is no result."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from s3lora_cli import cores
from s3lora_cli.errors import RuntimeProblem, one_line

R = TypeVar("R")
Done = tuple[str, R | None, str | None]


def run_here(task: Callable[..., R], items: Sequence[str], args: tuple[Any, ...]) -> Generator[Done[R], None, None]:
    """In this process, in order."""
    for item in items:
        yield item, task(item, *args), None


def _on_one_core(task: Callable[..., R], item: str, *args: Any) -> R:
    cores.init_worker(1)  # a Ray task of num_cpus=1: one thread in PyTorch and the kernels
    return task(item, *args)


def run_in_processes(
    task: Callable[..., R], items: Sequence[str], args: tuple[Any, ...], workers: int
) -> Generator[Done[R], None, None]:
    """In ``workers`` spawned processes (each with its share of the cores), in completion order. Interrupted (SIGINT,
    SIGTERM), it waits only for the tasks already running."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    with ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=context,
        initializer=cores.init_worker,
        initargs=(cores.share(workers),),
    ) as pool:
        futures = {pool.submit(task, item, *args): item for item in items}
        try:
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except Exception as exc:  # the worker process died (killed, out of memory)
                    yield futures[future], None, f"worker failed: {type(exc).__name__}: {one_line(exc)}"
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_on_ray(
    task: Callable[..., R], items: Sequence[str], args: tuple[Any, ...], address: str
) -> Generator[Done[R], None, None]:
    """As Ray tasks of one CPU each, in completion order. ``address``: "auto", an address such as
    "10.0.0.1:6379", or "local" for a Ray instance started here; a Ray instance already initialised in this
    process is used as it is (and left running)."""
    try:
        import ray
    except ImportError:
        raise RuntimeProblem("--ray needs Ray, which is not installed: pip install 's3lora[ray]'") from None
    started = False
    if not ray.is_initialized():
        _connect(ray, address)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_on_one_core)
        shared = tuple(ray.put(a) for a in args)
        pending = {remote.remote(task, item, *shared): item for item in items}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            more: list[Any] = []
            if len(pending) > 1:
                others = [r for r in pending if r not in done]
                more, _ = ray.wait(others, num_returns=max(len(pending) - 1, 1), timeout=0)
            for ref in [*done, *more]:
                item = pending.pop(ref)
                try:
                    yield item, ray.get(ref), None
                except Exception as exc:  # the task's worker died
                    yield item, None, f"Ray task failed: {type(exc).__name__}: {one_line(exc)}"
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str) -> None:
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:
        raise RuntimeProblem(
            f"cannot connect to a Ray cluster at {address!r}: {one_line(exc)}; start one with "
            "`ray start --head` (or pass --ray local for a Ray instance on this machine)"
        ) from None
