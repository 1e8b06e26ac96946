"""`s3lora scan --ray`: on a local Ray instance, the rows equal those of a local run (skipped without Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_store import POLICY, make_adapter
from typer.testing import CliRunner

from s3lora_cli.cli import EXIT_OK, app
from s3lora_cli.scoring import ScoreOptions
from s3lora_cli.store import ScanSettings, scan_store

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_instance():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray") / "store"
    for i in range(5):
        make_adapter(root / f"tenant-{i}", i + 1, sharp=i % 2 == 1)
    broken = make_adapter(root / "broken", 9)
    (broken / "adapter_config.json").write_text("{not json")
    return root


def without_cached(rows):
    return [{**row.__dict__, "cached": None} for row in rows]


def test_ray_rows_equal_local_rows(ray_instance, store: Path, tmp_path: Path):
    settings = ScanSettings(ScoreOptions(device="cpu"), POLICY)
    local = scan_store(store, settings)
    on_ray = scan_store(store, settings, cache_dir=tmp_path / "cache", ray_address="auto")
    assert on_ray.rows == local.rows
    assert [r.verdict for r in on_ray.rows].count("error") == 1 and ray_instance.is_initialized()
    cached = scan_store(store, settings, cache_dir=tmp_path / "cache", ray_address="auto")
    assert [r.cached for r in cached.rows] == [True] * 5 + [False]
    assert without_cached(cached.rows) == without_cached(local.rows)


def test_cli_scan_on_ray(ray_instance, store: Path):
    args = ["scan", str(store), "--max-ssi", "0.9", "--device", "cpu", "-q", "--no-cache", "-f", "json"]
    local = runner.invoke(app, args)
    on_ray = runner.invoke(app, [*args, "--ray", "auto"])
    assert local.exit_code == on_ray.exit_code == EXIT_OK, on_ray.output
    assert json.loads(on_ray.stdout) == json.loads(local.stdout)
