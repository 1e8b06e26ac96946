"""The thread budget: each process or job gets its share of the cores, a user's limit is the most it takes, a busy
machine lowers it, and the layers come back in order whatever the number of jobs (and score the same)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from s3lora_cli import cores
from s3lora_cli.scoring import ScoreOptions, score_adapter

DEMO = Path(cores.__file__).parent / "demo"


@pytest.fixture
def no_limit(monkeypatch):
    for name in cores.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cores, "available_cores", lambda: 8)


def test_share_splits_the_cores(no_limit):
    assert [cores.share(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_a_user_limit_is_the_most_taken(no_limit, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "junk")
    assert cores.user_limit() == 3
    assert cores.share(1) == 3 and cores.share(2) == 1


def test_default_jobs(monkeypatch):
    for count, jobs in ((1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(cores, "available_cores", lambda count=count: count)
        assert cores.default_jobs() == jobs


def test_prepare_process_keeps_the_users_choice(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cores.prepare_process()
    assert cores.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    cores.prepare_process()
    assert cores.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_budget_follows_the_cores_it_got(monkeypatch):
    """Over each interval: the cores left idle plus the CPU time this process used, at most its share."""
    samples = iter([(0.0, 0.0, 0.0), (1.0, 0.1, 0.9), (1.2, 0.1, 1.0), (2.0, 1.1, 1.8), (3.0, 1.1, 3.8)])
    monkeypatch.setattr(cores, "_sample", lambda: next(samples))
    set_to = []
    monkeypatch.setattr(cores, "set_threads", set_to.append)
    budget = cores.Budget(2)
    assert budget.adjust() == 1  # busy: 0.1 idle + 0.9 used
    assert budget.adjust() == 1  # too short an interval to measure
    assert budget.adjust() == 2  # 1 idle + 0.9 used per second
    assert budget.adjust() == 2  # capped at the share
    assert set_to == [2, 1, 2]


def test_budget_without_proc_stat_keeps_its_share(monkeypatch):
    monkeypatch.setattr(cores, "_sample", lambda: None)
    monkeypatch.setattr(cores, "set_threads", lambda n: None)
    assert cores.Budget(3).adjust() == 3


def test_ordered_map_keeps_the_order_and_bounds_what_is_in_flight():
    in_flight, most, lock = [0], [0], threading.Lock()

    def work(x):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.01 * (x % 3))
        with lock:
            in_flight[0] -= 1
        return x * x

    started = []
    assert list(cores.ordered_map(work, range(12), 3, start=lambda: started.append(1))) == [x * x for x in range(12)]
    assert most[0] <= 3 and 1 <= len(started) <= 3
    assert list(cores.ordered_map(work, range(5), 1)) == [x * x for x in range(5)]


def test_jobs_and_threads_do_not_change_the_scores():
    before = torch.get_num_threads()
    try:
        one = score_adapter(DEMO, ScoreOptions(device="cpu"), jobs=1)
        two = score_adapter(DEMO, ScoreOptions(device="cpu"), jobs=2)
    finally:
        torch.set_num_threads(before)
    assert [(s.module, s.ssi, s.sigma, s.picks) for s in one.layers] == [
        (s.module, s.ssi, s.sigma, s.picks) for s in two.layers
    ]
