"""Adapter stores: `s3lora scan` (discovery, ranking, errors per adapter, the cache, worker processes, formats,
exit codes), redundancy between adapters, and `s3lora admit` (store or quarantine, the audit log, the lock,
concurrent admits and a crash in the middle of one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from adapter_factory import config_dict, layer_tensors, random_factors, write_adapter
from typer.testing import CliRunner

from s3lora_cli.adapters import files as files_mod
from s3lora_cli.cli import EXIT_GATE_FAILED, EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, app
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, UsageError
from s3lora_cli.gate import GatePolicy
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.store import (
    AUDIT_LOG_NAME,
    LOCK_NAME,
    ScanSettings,
    admit_adapter,
    discover,
    nearest_neighbours,
    quarantine_dir,
    read_audit_log,
    report_from_cache,
    report_to_cache,
    scan_settings,
    scan_store,
    with_neighbours,
)

runner = CliRunner()
DEAD_PID = 2**30  # above any pid_max: the pid of a process that is gone
TEMP_PREFIX = f".killed.{DEAD_PID}-"  # what a killed run leaves: .<target>.<pid>-<token>.s3lora-tmp
POLICY = GatePolicy(max_ssi=0.9)
FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def make_adapter(path: Path, seed: int, sharp: bool = False, negate: bool = False) -> Path:
    """Two layers (q_proj 16x16, v_proj 8x16, r = 4) from ``seed``; ``sharp``: v_proj nearly rank one (SSI > 0.9);
    ``negate``: every lora_B negated (the update -dW)."""
    tensors = {}
    for i, (proj, out) in enumerate((("q_proj", 16), ("v_proj", 8))):
        a, b = random_factors(out, 16, 4, seed * 10 + i, sharp=sharp and proj == "v_proj")
        tensors.update(layer_tensors(f"model.layers.0.self_attn.{proj}", a, -b if negate else b))
    return write_adapter(path, tensors)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """store/{team-a/calm, team-a/sharp, team-b/calm-copy (same update as calm), broken (corrupt weights)}."""
    root = tmp_path / "store"
    make_adapter(root / "team-a" / "calm", 1)
    make_adapter(root / "team-a" / "sharp", 2, sharp=True)
    make_adapter(root / "team-b" / "calm-copy", 1)
    broken = make_adapter(root / "broken", 3)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return root


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def adapter_files(root: Path) -> dict[str, bytes]:
    """The files of the store's adapters (everything but the hidden cache)."""
    return {k: v for k, v in files_under(root).items() if not k.startswith(".")}


def comparable(rows):
    return [{**row.__dict__, "cached": None} for row in rows]


# --- scan -------------------------------------------------------------------------------------------------


def test_scan_ranks_by_risk_and_reports_unreadable_adapters(store: Path):
    result = scan_store(store, ScanSettings(ScoreOptions(device="cpu"), POLICY, top=2))
    assert [r.path for r in result.rows] == ["team-a/sharp", "team-a/calm", "team-b/calm-copy", "broken"]
    sharp, calm, copy, broken = result.rows
    assert sharp.verdict == "failed" and sharp.over_threshold == 1 and sharp.max_ssi > 0.9
    assert sharp.failing and sharp.failing[0].startswith("model.layers.0.self_attn.v_proj: SSI")
    assert [t.module for t in sharp.top_layers][0] == "model.layers.0.self_attn.v_proj" and len(sharp.top_layers) == 2
    assert calm.verdict == copy.verdict == "passed" and calm.over_threshold == 0 and calm.sha256 == copy.sha256
    assert broken.verdict == "error" and "adapter_model.safetensors" in broken.error
    reference = score_adapter(store / "team-a" / "sharp", ScoreOptions(device="cpu"))
    assert sharp.max_ssi == reference.layers[0].ssi and sharp.sha256 == reference.adapter.sha256


def test_scan_without_a_policy_ranks_by_ssi(store: Path, tmp_path: Path):
    settings = scan_settings({"max-ssi": None}, None, "cpu", cwd=tmp_path)
    assert settings.policy is None
    result = scan_store(store, settings)
    assert [r.verdict for r in result.rows] == ["scored", "scored", "scored", "error"]
    assert result.rows[0].path == "team-a/sharp" and result.rows[0].over_threshold is None


def test_policy_file_applies_to_scan(store: Path, tmp_path: Path):
    policy = tmp_path / "policy.toml"
    policy.write_text("max-ssi = 0.95\nmax-flagged = 1\n")
    settings = scan_settings({}, policy, "cpu")
    assert settings.policy.max_ssi == 0.95 and settings.policy.max_violations == 1


def test_cache_makes_a_rescan_equal_and_never_writes_into_adapters(store: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    before = adapter_files(store)
    settings = ScanSettings(ScoreOptions(device="cpu"), POLICY)
    first = scan_store(store, settings, cache)
    # calm and calm-copy have the same weights and config: one entry serves both
    assert sum(r.cached for r in first.rows) == 1
    second = scan_store(store, settings, cache)
    assert [r.cached for r in second.rows] == [True, True, True, False]  # the broken one is never cached
    assert comparable(second.rows) == comparable(first.rows)
    assert adapter_files(store) == before
    # other scoring parameters are another entry
    third = scan_store(store, ScanSettings(ScoreOptions(device="cpu", components=2), POLICY), cache)
    assert sum(r.cached for r in third.rows) == 1  # only the copy, after calm
    # new weights are a miss
    make_adapter(store / "team-a" / "calm", 5)
    fourth = scan_store(store, settings, cache)
    assert {r.path: r.cached for r in fourth.rows}["team-a/calm"] is False


def test_a_damaged_cache_entry_is_a_miss(store: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    settings = ScanSettings(ScoreOptions(device="cpu"), POLICY)
    first = scan_store(store, settings, cache)
    for entry in cache.rglob("*.json"):
        entry.write_text("{truncated")
    again = scan_store(store, settings, cache)
    assert sum(r.cached for r in again.rows) == 1  # rescored (and rewritten) once, then shared by the copy
    assert comparable(again.rows) == comparable(first.rows)


def test_cached_report_round_trip(store: Path):
    options = ScoreOptions(device="cpu")
    report = score_adapter(store / "team-a" / "sharp", options)
    doc = json.loads(json.dumps(report_to_cache(report)))
    back = report_from_cache(doc, report.adapter.path, options)
    assert [(s.module, s.ssi, s.sigma, s.layer) for s in back.layers] == [
        (s.module, s.ssi, s.sigma, s.layer) for s in report.layers
    ]
    assert back.adapter == report.adapter and back.not_analysed == report.not_analysed


def test_two_worker_processes_give_the_same_rows(store: Path):
    settings = ScanSettings(ScoreOptions(device="cpu"), POLICY)
    assert scan_store(store, settings, workers=2).rows == scan_store(store, settings).rows


def test_discover_skips_hidden_directories(store: Path):
    make_adapter(store / ".s3lora-cache" / "x", 7)
    make_adapter(store / f"{TEMP_PREFIX}0000abcd.s3lora-tmp", 7)
    assert [p.relative_to(store).as_posix() for p in discover(store)] == [
        "broken",
        "team-a/calm",
        "team-a/sharp",
        "team-b/calm-copy",
    ]


# --- scan on the command line -----------------------------------------------------------------------------


def test_cli_scan_table_json_jsonl(store: Path):
    args = ["scan", str(store), "--max-ssi", "0.9", "--device", "cpu", "-q"]
    table = runner.invoke(app, args)
    assert table.exit_code == EXIT_OK, table.output
    assert "team-a/sharp" in table.stdout and "failed" in table.stdout
    doc = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    assert doc["schema_version"] == 2 and doc["summary"] == {
        "adapters": 4,
        "passed": 2,
        "failed": 1,
        "errors": 1,
        "cached": 4 - 1,
        "with_duplicates": 0,
    }
    assert [a["path"] for a in doc["adapters"]][0] == "team-a/sharp" and doc["parameters"]["max_ssi"] == 0.9
    assert doc["adapters"][0]["neighbours"] is None
    lines = runner.invoke(app, [*args, "--format", "jsonl", "--no-cache"]).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert sorted(r["path"] for r in rows) == ["broken", "team-a/calm", "team-a/sharp", "team-b/calm-copy"]
    assert not any(r["cached"] for r in rows)
    assert (store / ".s3lora-cache").is_dir()


def test_cli_scan_strict_and_usage_errors(store: Path, tmp_path: Path):
    base = ["scan", str(store), "--device", "cpu", "-q", "--no-cache"]
    assert runner.invoke(app, [*base, "--max-ssi", "0.9", "--strict"]).exit_code == EXIT_GATE_FAILED
    assert runner.invoke(app, [*base, "--max-ssi", "1", "--strict"]).exit_code == EXIT_GATE_FAILED  # broken
    assert runner.invoke(app, [*base, "--max-ssi", "1"]).exit_code == EXIT_OK
    (store / "broken" / "adapter_model.safetensors").unlink()
    (store / "broken" / "adapter_config.json").unlink()
    assert runner.invoke(app, [*base, "--max-ssi", "1", "--strict"]).exit_code == EXIT_OK
    for extra, message in (
        (["--strict"], "--strict needs a gate rule"),
        (["--workers", "2", "--ray", "auto"], "exclude each other"),
        (["--cache-dir", str(tmp_path)], "exclude each other"),
        (["--workers", "0"], "--workers must be at least 1"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == EXIT_USAGE, (extra, result.output)
        assert message in result.stderr and "Traceback" not in result.output
    inside = runner.invoke(app, ["scan", str(store), "-q", "--cache-dir", str(store / "team-a" / "calm" / "c")])
    assert inside.exit_code == EXIT_USAGE and "inside the adapter" in inside.stderr
    assert not (store / "team-a" / "calm" / "c").exists()
    out = tmp_path / "out.json"
    out.write_text("x")
    assert runner.invoke(app, [*base, "-f", "json", "-o", str(out)]).exit_code == EXIT_USAGE
    assert runner.invoke(app, [*base, "-f", "json", "-o", str(out), "--force"]).exit_code == EXIT_OK
    assert json.loads(out.read_text())["summary"]["adapters"] == 3
    missing = runner.invoke(app, ["scan", str(tmp_path / "nope"), "-q"])
    assert missing.exit_code == EXIT_INPUT and "no such file or directory" in missing.stderr


def test_cli_scan_ray_without_ray_says_how_to_install(store: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = runner.invoke(app, ["scan", str(store), "--ray", "auto", "-q", "--device", "cpu"])
    assert result.exit_code == EXIT_RUNTIME
    assert "pip install 's3lora[ray]'" in result.stderr and "Traceback" not in result.output


# --- redundancy -------------------------------------------------------------------------------------------


def test_similar_flags_duplicates(store: Path, tmp_path: Path):
    make_adapter(store / "team-c" / "negated", 1, negate=True)
    result = with_neighbours(scan_store(store, ScanSettings(ScoreOptions(device="cpu"))), k=1, threshold=0.95)
    rows = {r.path: r for r in result.rows}
    calm = rows["team-a/calm"]
    assert calm.neighbours[0].path == "team-b/calm-copy" and calm.neighbours[0].cosine == pytest.approx(1.0)
    assert calm.neighbours[0].duplicate and calm.neighbours[0].shared_modules == 2
    negated = rows["team-c/negated"].neighbours
    assert len(negated) == 1 and not negated[0].duplicate
    assert rows["broken"].neighbours == ()
    cli = runner.invoke(app, ["scan", str(store), "--similar", "-f", "json", "-q", "--no-cache", "--device", "cpu"])
    doc = json.loads(cli.stdout)
    assert doc["summary"]["with_duplicates"] == 2
    by_path = {a["path"]: a for a in doc["adapters"]}
    assert by_path["team-b/calm-copy"]["neighbours"][0] == {
        "path": "team-a/calm",
        "cosine": 1.0,
        "shared_modules": 2,
        "duplicate": True,
    }


def test_neighbours_in_blocks_equal_neighbours_at_once(store: Path):
    make_adapter(store / "team-c" / "negated", 1, negate=True)
    paths = [p for p in discover(store) if p.name != "broken"]
    whole = nearest_neighbours(paths, paths, store, k=4, threshold=0.95)
    tiled = nearest_neighbours(paths, paths, store, k=4, threshold=0.95, budget_bytes=1)  # one adapter a block
    assert whole == tiled
    negated = {n.path: n.cosine for n in whole[store / "team-c" / "negated"]}
    assert negated["team-a/calm"] == pytest.approx(-1.0)


# --- admit ------------------------------------------------------------------------------------------------


def test_admit_passes_into_the_store_and_logs(tmp_path: Path):
    pool = tmp_path / "pool"
    candidate = make_adapter(tmp_path / "incoming" / "calm", 1)
    result = admit_adapter(candidate, pool, POLICY, device="cpu", clock=lambda: FIXED_TIME)
    assert result.admitted and not result.already_present
    assert result.destination == pool / f"calm-{result.key[:12]}"
    assert files_under(result.destination) == files_under(candidate)
    (entry,) = read_audit_log(pool / AUDIT_LOG_NAME)
    assert entry["time"] == "2026-01-02T03:04:05+00:00" and entry["verdict"] == "admitted"
    assert entry["sha256"] == result.sha256 and entry["reasons"] == []
    again = admit_adapter(candidate, pool, POLICY, device="cpu")
    assert again.admitted and again.already_present
    assert [e["already_present"] for e in read_audit_log(pool / AUDIT_LOG_NAME)] == [False, True]
    # the copy is found by scan, and a near-duplicate of it is flagged at the next admit
    assert [p.name for p in discover(pool)] == [result.name]
    # the same content under another name is not copied twice
    twin = admit_adapter(make_adapter(tmp_path / "incoming" / "twin", 1), pool, POLICY, device="cpu", name="twin2")
    assert twin.already_present and twin.destination == result.destination and twin.key == result.key
    # the same weights with another lora_alpha (an update 8x larger) are another entry, flagged as a near-duplicate
    louder = make_adapter(tmp_path / "incoming" / "louder", 1)
    (louder / "adapter_config.json").write_text(json.dumps(config_dict(lora_alpha=64)))
    loud = admit_adapter(louder, pool, POLICY, device="cpu")
    assert loud.admitted and not loud.already_present and loud.sha256 == result.sha256 and loud.key != result.key
    assert loud.neighbours[0].duplicate and loud.record["duplicates"] == [{"path": result.name, "cosine": 1.0}]
    assert sorted(p.name for p in discover(pool)) == sorted([result.name, loud.name])


def test_admit_refuses_into_quarantine_with_the_report(tmp_path: Path):
    pool = tmp_path / "pool"
    candidate = make_adapter(tmp_path / "sharp", 2, sharp=True)
    before = files_under(candidate)
    result = admit_adapter(candidate, pool, POLICY, device="cpu", report_json=lambda gate: "{}\n")
    assert not result.admitted
    assert result.destination.parent == quarantine_dir(pool) == tmp_path / "pool.quarantine"
    record = json.loads((result.destination / "s3lora-admit.json").read_text())
    assert record["verdict"] == "refused" and record["reasons"][0].startswith("model.layers.0.self_attn.v_proj")
    assert (result.destination / "s3lora-report.json").read_text() == "{}\n"
    assert discover(pool) == [] and files_under(candidate) == before
    assert read_audit_log(pool / AUDIT_LOG_NAME)[0]["verdict"] == "refused"


def test_a_refused_adapter_that_carries_a_report_or_a_record_is_quarantined(tmp_path: Path):
    """A prune output holds s3lora-report.json and a quarantined entry also s3lora-admit.json: admitting either
    (refused) quarantines it with this decision's files in place of its own, and leaves the input as it was."""
    pool = tmp_path / "pool"
    candidate = make_adapter(tmp_path / "sharp", 2, sharp=True)
    (candidate / "s3lora-report.json").write_text('{"prune": true}\n')
    (candidate / "notes.txt").write_text("kept\n")
    before = files_under(candidate)
    first = admit_adapter(candidate, pool, POLICY, device="cpu", report_json=lambda gate: "{}\n")
    assert not first.admitted and (first.destination / "s3lora-report.json").read_text() == "{}\n"
    assert (first.destination / "notes.txt").read_text() == "kept\n" and files_under(candidate) == before
    assert any("s3lora-report.json is replaced" in note for note in first.warnings)
    again = admit_adapter(first.destination, tmp_path / "other", POLICY, device="cpu", report_json=lambda g: "[]\n")
    assert not again.admitted and (again.destination / "s3lora-report.json").read_text() == "[]\n"
    record = json.loads((again.destination / "s3lora-admit.json").read_text())
    assert record["adapter"] == str(first.destination.resolve())
    assert [r["verdict"] for r in read_audit_log(tmp_path / "other" / AUDIT_LOG_NAME)] == ["refused"]


def test_cli_admit_exit_codes_and_json(tmp_path: Path):
    pool = tmp_path / "pool"
    calm = make_adapter(tmp_path / "calm", 1)
    sharp = make_adapter(tmp_path / "sharp", 2, sharp=True)
    ok = runner.invoke(
        app, ["admit", str(calm), "--store", str(pool), "--max-ssi", "0.9", "-f", "json", "--device", "cpu"]
    )
    assert ok.exit_code == EXIT_OK, ok.output
    doc = json.loads(ok.stdout)
    assert doc["gate"]["passed"] and doc["admit"]["admitted"] and Path(doc["admit"]["destination"]).is_dir()
    assert doc["admit"]["name"].endswith("-" + doc["admit"]["key"][:12])
    assert (doc["admit"]["broken"], doc["admit"]["warnings"]) == ([], [])
    assert "admitted" in ok.stderr
    refused = runner.invoke(app, ["admit", str(sharp), "--store", str(pool), "--max-ssi", "0.9", "-q"])
    assert refused.exit_code == EXIT_GATE_FAILED
    quarantined = next((tmp_path / "pool.quarantine").iterdir())
    assert json.loads((quarantined / "s3lora-report.json").read_text())["gate"]["passed"] is False
    for args, code, message in (
        ([str(calm), "--store", str(pool)], EXIT_USAGE, "no gate rule"),
        ([str(tmp_path / "nope"), "--store", str(pool), "--max-ssi", "0.9"], EXIT_INPUT, "no such file"),
        ([str(pool / doc["admit"]["name"]), "--store", str(pool), "--max-ssi", "0.9"], EXIT_USAGE, "overlap"),
        ([str(calm), "--store", str(calm / "adapter_config.json"), "--max-ssi", "0.9"], EXIT_USAGE, "not a dir"),
        ([str(calm), "--store", str(pool), "--max-ssi", "0.9", "--name", ".hidden"], EXIT_USAGE, "--name"),
    ):
        result = runner.invoke(app, ["admit", *args, "-q"])
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output
    assert len(read_audit_log(pool / AUDIT_LOG_NAME)) == 2


def test_a_crash_mid_copy_leaves_the_store_consistent(tmp_path: Path, monkeypatch):
    pool = tmp_path / "pool"
    first = admit_adapter(make_adapter(tmp_path / "first", 1), pool, POLICY, device="cpu")
    before = files_under(pool)
    copies = []

    real_copy = files_mod.copy_file

    def failing_copy(src, dst, size):
        copies.append(src)
        if len(copies) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, size)

    monkeypatch.setattr(files_mod, "copy_file", failing_copy)
    candidate = make_adapter(tmp_path / "second", 4)
    with pytest.raises(RuntimeProblem, match="No space left"):
        admit_adapter(candidate, pool, POLICY, device="cpu")
    assert len(copies) == 2 and files_under(pool) == before  # no partial adapter, no temp dir, no log line
    monkeypatch.undo()
    # a process killed mid-copy leaves its temp dir: scan ignores it and the next admit removes it
    stale = pool / f"{TEMP_PREFIX}0000abcd.s3lora-tmp"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert [p.name for p in discover(pool)] == [first.name]
    assert [r.path for r in scan_store(pool).rows] == [first.name]
    result = admit_adapter(candidate, pool, POLICY, device="cpu")
    assert result.admitted and not stale.exists()
    assert sorted(p.name for p in discover(pool)) == sorted([first.name, result.name])
    assert len(read_audit_log(pool / AUDIT_LOG_NAME)) == 2


def test_weights_changed_after_the_gate_are_not_admitted(tmp_path: Path, monkeypatch):
    pool = tmp_path / "pool"

    real_copy = files_mod.copy_file

    def tampering_copy(src, dst, size):
        real_copy(src, dst, size)
        if dst.name.endswith(".safetensors"):
            dst.write_bytes(dst.read_bytes() + b" ")

    monkeypatch.setattr(files_mod, "copy_file", tampering_copy)
    with pytest.raises(AdapterInputError, match="changed while it was being admitted"):
        admit_adapter(make_adapter(tmp_path / "calm", 1), pool, POLICY, device="cpu")
    assert sorted(p.name for p in pool.iterdir()) == [LOCK_NAME]


def test_a_held_lock_times_out_with_a_runtime_error(tmp_path: Path):
    from filelock import FileLock

    pool = tmp_path / "pool"
    pool.mkdir()
    with FileLock(str(pool / LOCK_NAME)):
        with pytest.raises(RuntimeProblem, match="stayed locked"):
            admit_adapter(make_adapter(tmp_path / "calm", 1), pool, POLICY, device="cpu", lock_timeout=0.05)
    assert not (pool / AUDIT_LOG_NAME).exists()


def test_admit_refuses_a_name_taken_by_other_weights(tmp_path: Path):
    pool = tmp_path / "pool"
    first = admit_adapter(make_adapter(tmp_path / "a", 1), pool, POLICY, device="cpu")
    make_adapter(first.destination, 6)  # someone replaced the weights inside the store
    with pytest.raises(UsageError, match="exists with other content"):
        admit_adapter(make_adapter(tmp_path / "b" / "a", 1), pool, POLICY, device="cpu")


def test_two_admits_at_once_in_processes(tmp_path: Path):
    pool = tmp_path / "pool"
    candidates = [make_adapter(tmp_path / name, seed) for name, seed in (("one", 1), ("two", 2))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3lora_cli",
                "admit",
                str(c),
                "--store",
                str(pool),
                "--max-ssi",
                "0.999",
                "--device",
                "cpu",
                "-q",
                "-f",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for c in candidates
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_OK, EXIT_OK], outs
    log = read_audit_log(pool / AUDIT_LOG_NAME)
    assert sorted(e["name"].split("-")[0] for e in log) == ["one", "two"]
    assert sorted(p.name.split("-")[0] for p in discover(pool)) == ["one", "two"]
    assert not [p for p in pool.iterdir() if p.name.endswith(".s3lora-tmp")]
    for c in candidates:
        dest = pool / json.loads(outs[candidates.index(c)][0])["admit"]["name"]
        assert files_under(dest) == files_under(c)


def test_store_and_similarity_point_one_way():
    from test_architecture import modules

    found = modules()
    store = [name for name in found if name == "s3lora_cli.store" or name.startswith("s3lora_cli.store.")]
    assert len(store) > 1
    for name in (*store, "s3lora_cli.similarity"):
        for bad in ("typer", "rich", "s3lora_cli.cli", "s3lora_cli.report"):
            assert not any(i == bad or i.startswith(bad + ".") for i in found[name]), (name, bad)
    # the math takes tensors and returns tensors: no file I/O, no other s3lora module
    assert not [i for i in found["s3lora_cli.similarity"] if i.startswith(("s3lora_cli", "safetensors", "json"))]
