"""Nothing lost, nothing let in: the write paths of prune, admit, scan, score -o and check under faults (short
writes, a full or read-only file system, names too long, kills by signal at several points of a copy), hostile
adapter directories (symlinks out and in loops, named pipes), outputs aimed at inputs, concurrent admits sharing a
quarantine, and the store's content key."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from adapter_factory import config_dict, layer_tensors, random_factors, write_adapter
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from s3lora_cli import durable
from s3lora_cli.adapters import files as files_mod
from s3lora_cli.cli import EXIT_GATE_FAILED, EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_SIGINT, EXIT_USAGE, app
from s3lora_cli.errors import RuntimeProblem
from s3lora_cli.gate import GatePolicy
from s3lora_cli.store import AUDIT_LOG_NAME, admit_adapter, discover, read_audit_log
from s3lora_cli.store import admission as admission_mod

runner = CliRunner()
POLICY = GatePolicy(max_ssi=0.99)
DEAD_PID = 2**30  # above any pid_max: the pid of a process that is gone
ROOT = Path(__file__).resolve().parent.parent


def make_adapter(path: Path, seed: int = 1, sharp: bool = False, **config) -> Path:
    """Two blocks of q_proj (16x16) and v_proj (8x16), r = 4; ``sharp``: block 0's v_proj nearly rank one."""
    tensors = {}
    for block in range(2):
        for i, (proj, out) in enumerate((("q_proj", 16), ("v_proj", 8))):
            sharp_here = sharp and (block, proj) == (0, "v_proj")
            a, b = random_factors(out, 16, 4, seed * 10 + 2 * block + i, sharp=sharp_here)
            tensors.update(layer_tensors(f"model.layers.{block}.self_attn.{proj}", a, b))
    return write_adapter(path, tensors, config_dict(**config))


def prune_cli(adapter: Path, out: Path, *more: str):
    """`s3lora prune ADAPTER --tau 1 -o OUT -q --device cpu MORE...` through the CLI runner."""
    return runner.invoke(app, ["prune", str(adapter), "--tau", "1", "-o", str(out), "-q", "--device", "cpu", *more])


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes; symlinks as 'link:target'."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"link:{os.readlink(path)}"
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(result, code: int, *fragments: str) -> str:
    """The run exited ``code`` with one 'error:' line on stderr holding every fragment, no traceback, no repr."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.output and "internal error" not in message, message
    assert "[Errno" not in message and "OSError(" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


class FaultyOs:
    """``os`` as durable.py and the store see it, with chosen calls replaced (the fault injection layer)."""

    def __init__(self, **overrides):
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(os, name)


# --- what gets copied -------------------------------------------------------------------------------------------


def hostile_dirs(tmp_path: Path) -> dict[str, Path]:
    """Adapters whose directory holds something that must not be copied."""
    outside = tmp_path / "outside"
    (outside / "docs").mkdir(parents=True)
    (outside / "docs" / "big.txt").write_text("x" * 1000)
    (outside / "hostname").write_text("secret\n")
    cases = {}
    cases["dir-link-out"] = make_adapter(tmp_path / "dir-link-out")
    (cases["dir-link-out"] / "docs").symlink_to(outside / "docs")
    cases["file-link-out"] = make_adapter(tmp_path / "file-link-out")
    (cases["file-link-out"] / "README.md").symlink_to(outside / "hostname")
    cases["dev-zero"] = make_adapter(tmp_path / "dev-zero")
    (cases["dev-zero"] / "notes.txt").symlink_to("/dev/zero")
    cases["loops"] = make_adapter(tmp_path / "loops")
    (cases["loops"] / "a").symlink_to(".")
    (cases["loops"] / "b").symlink_to(".")
    cases["fifo"] = make_adapter(tmp_path / "fifo")
    os.mkfifo(cases["fifo"] / "pipe")
    cases["fifo-in-folder"] = make_adapter(tmp_path / "fifo-in-folder")
    (cases["fifo-in-folder"] / "extra").mkdir()
    os.mkfifo(cases["fifo-in-folder"] / "extra" / "pipe")
    cases["link-to-fifo"] = make_adapter(tmp_path / "link-to-fifo")
    os.mkfifo(cases["link-to-fifo"] / "zz-pipe")
    (cases["link-to-fifo"] / "notes").symlink_to("zz-pipe")
    return cases


NAMED = {
    "dir-link-out": "docs",
    "file-link-out": "README.md",
    "dev-zero": "notes.txt",
    "loops": "/a",
    "fifo": "pipe",
    "fifo-in-folder": "extra/pipe",
    "link-to-fifo": "notes",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_prune_and_admit_refuse_what_is_not_a_file_inside_the_adapter(tmp_path):
    """Every command that copies an adapter refuses, with exit 3 naming the entry, a symlink leading outside it
    (to a directory, a file, /dev/zero), a symlink loop, and a named pipe (also one reached through a link);
    nothing is written: no output, no store entry, no audit record, no temporary directory."""
    for case, adapter in hostile_dirs(tmp_path).items():
        before = tree(tmp_path)
        out = tmp_path / f"{case}-out"
        result = prune_cli(adapter, out)
        one_line_error(result, EXIT_INPUT, NAMED[case], "refused")
        store = tmp_path / f"{case}-store"
        result = runner.invoke(
            app, ["admit", str(adapter), "--store", str(store), "--max-ssi", "0.99", "-q", "--device", "cpu"]
        )
        one_line_error(result, EXIT_INPUT, NAMED[case], "refused")
        assert not out.exists()
        assert [p.name for p in store.iterdir()] in ([], [".s3lora.lock"]), case
        after = tree(tmp_path)
        assert {k: v for k, v in after.items() if k != f"{case}-store/.s3lora.lock"} == before, case


def test_a_symlink_to_a_file_inside_is_copied_as_a_file(tmp_path):
    """...and version control's folder is not part of the adapter."""
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "tokenizer").mkdir()
    (adapter / "tokenizer" / "vocab.txt").write_text("a b c\n")
    (adapter / "vocab.txt").symlink_to("tokenizer/vocab.txt")
    (adapter / ".git" / "objects").mkdir(parents=True)
    (adapter / ".git" / "objects" / "pack").write_bytes(b"\0" * 100)
    out = tmp_path / "out"
    assert prune_cli(adapter, out).exit_code == EXIT_OK
    assert (out / "vocab.txt").read_text() == "a b c\n" and not (out / "vocab.txt").is_symlink()
    assert (out / "tokenizer" / "vocab.txt").is_file() and not (out / ".git").exists()
    result = admit_adapter(adapter, tmp_path / "store", POLICY, device="cpu")
    assert (result.destination / "vocab.txt").read_text() == "a b c\n"


def test_the_other_files_are_bounded(tmp_path, monkeypatch):
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "optimizer.pt").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(files_mod, "MAX_OTHER_BYTES", 4095)
    result = prune_cli(adapter, tmp_path / "out")
    one_line_error(result, EXIT_INPUT, "4096 bytes", "over the limit")
    with pytest.raises(Exception, match="over the limit"):
        admit_adapter(adapter, tmp_path / "store", POLICY, device="cpu")
    monkeypatch.setattr(files_mod, "MAX_OTHER_BYTES", 4096)
    monkeypatch.setattr(files_mod, "MAX_OTHER_FILES", 0)
    one_line_error(prune_cli(adapter, tmp_path / "out"), EXIT_INPUT, "number 1", "over the limit")
    assert not (tmp_path / "out").exists() and discover(tmp_path / "store") == []
    assert not (tmp_path / "store" / AUDIT_LOG_NAME).exists()


def test_a_file_that_grows_while_it_is_copied_is_refused(tmp_path, monkeypatch):
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "log.txt").write_text("line\n")
    real_plan = files_mod.plan_copy

    def plan_then_grow(*args, **kwargs):
        planned = real_plan(*args, **kwargs)
        with open(adapter / "log.txt", "a") as fh:
            fh.write("more\n" * 1000)
        return planned

    monkeypatch.setattr(admission_mod, "plan_copy", plan_then_grow)
    with pytest.raises(Exception, match="changed size while it was copied"):
        admit_adapter(adapter, tmp_path / "store", POLICY, device="cpu")
    assert discover(tmp_path / "store") == [] and not (tmp_path / "store" / AUDIT_LOG_NAME).exists()


# --- the audit log ------------------------------------------------------------------------------------------------


def test_short_writes_still_give_whole_lines(tmp_path, monkeypatch):
    """os.write writing at most 7 bytes a call (as a nearly full disk or a signal may): each record is whole."""

    def short_write(fd, data):
        return os.write(fd, bytes(data[:7]))

    monkeypatch.setattr(durable, "os", FaultyOs(write=short_write))
    store = tmp_path / "store"
    for seed in (1, 2):
        admit_adapter(make_adapter(tmp_path / f"a{seed}", seed), store, POLICY, device="cpu")
    lines = (store / AUDIT_LOG_NAME).read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["verdict"] for line in lines[:-1]] == ["admitted", "admitted"]


def test_a_full_disk_while_logging_admits_nothing_and_keeps_the_log_whole(tmp_path, monkeypatch):
    """ENOSPC after half of the record: exit 4 naming the log and the reason; the log is as it was (the half line
    is cut off again), and the adapter is not in the store: an admission that cannot be recorded is not made."""
    store = tmp_path / "store"
    admit_adapter(make_adapter(tmp_path / "first", 1), store, POLICY, device="cpu")
    before = tree(store)
    log = store / AUDIT_LOG_NAME

    def full_after_half(fd, data):
        if os.fstat(fd).st_ino == log.stat().st_ino:
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log))
        return os.write(fd, data)

    monkeypatch.setattr(durable, "os", FaultyOs(write=full_after_half))
    result = runner.invoke(
        app,
        [
            "admit",
            str(make_adapter(tmp_path / "second", 2)),
            "--store",
            str(store),
            "--max-ssi",
            "0.99",
            "-q",
            "--device",
            "cpu",
        ],
    )
    one_line_error(result, EXIT_RUNTIME, str(log), "No space left on device", "was not admitted")
    assert tree(store) == before


def test_a_failed_rename_takes_the_record_back(tmp_path, monkeypatch):
    store = tmp_path / "store"
    admit_adapter(make_adapter(tmp_path / "first", 1), store, POLICY, device="cpu")
    before = tree(store)

    def no_room(tmp, destination, replace):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(durable, "install_dir", no_room)
    with pytest.raises(RuntimeProblem, match="No space left on device"):
        admit_adapter(make_adapter(tmp_path / "second", 2), store, POLICY, device="cpu")
    assert tree(store) == before


def test_a_torn_last_line_is_skipped_with_a_warning_and_never_appended_to(tmp_path):
    store = tmp_path / "store"
    admit_adapter(make_adapter(tmp_path / "first", 1), store, POLICY, device="cpu")
    log = store / AUDIT_LOG_NAME
    with open(log, "ab") as fh:
        fh.write(b'{"time": "2026-01-0')  # what a full disk left
    result = runner.invoke(
        app,
        [
            "admit",
            str(make_adapter(tmp_path / "second", 2)),
            "--store",
            str(store),
            "--max-ssi",
            "0.99",
            "--device",
            "cpu",
            "-f",
            "json",
        ],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "last line is incomplete" in result.stderr
    lines = log.read_bytes().split(b"\n")
    assert lines[1] == b'{"time": "2026-01-0' and json.loads(lines[2])["verdict"] == "admitted"
    with pytest.warns(UserWarning, match="line 2 is not a whole record"):
        records = read_audit_log(log)
    assert [r["name"] for r in records] == [json.loads(lines[0])["name"], json.loads(lines[2])["name"]]


# --- the store's identity and broken members --------------------------------------------------------------------


def test_same_weights_other_alpha_is_another_entry(tmp_path):
    """The issue's case: the same weights with lora_alpha 8x larger (an update 8x larger) are admitted as their own
    entry, not reported as already in the store."""
    store = tmp_path / "store"
    first = admit_adapter(make_adapter(tmp_path / "a", 1, lora_alpha=8), store, POLICY, device="cpu")
    loud = admit_adapter(make_adapter(tmp_path / "b" / "a", 1, lora_alpha=64), store, POLICY, device="cpu")
    assert loud.sha256 == first.sha256 and not loud.already_present and loud.destination != first.destination
    again = admit_adapter(make_adapter(tmp_path / "c", 1, lora_alpha=64), store, POLICY, device="cpu", name="other")
    assert again.already_present and again.destination == loud.destination
    assert len(discover(store)) == 2


def test_a_broken_member_never_blocks_admitting_others(tmp_path):
    store = tmp_path / "store"
    first = admit_adapter(make_adapter(tmp_path / "a", 1), store, POLICY, device="cpu")
    weights = first.destination / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    result = runner.invoke(
        app,
        ["admit", str(make_adapter(tmp_path / "b", 2)), "--store", str(store), "--max-ssi", "0.99", "--device", "cpu"],
    )
    assert result.exit_code == EXIT_OK, result.output
    assert f"warning: {store}/{first.name}" in " ".join(result.stderr.split())
    assert len(read_audit_log(store / AUDIT_LOG_NAME)) == 2


# --- outputs never land on inputs ---------------------------------------------------------------------------------


def test_no_output_option_may_name_a_file_of_an_input(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    baseline = make_adapter(tmp_path / "baseline", 2)
    weights = adapter / "adapter_model.safetensors"
    (tmp_path / "link").symlink_to(weights)
    store = tmp_path / "store"
    make_adapter(store / "member", 3)
    before = tree(tmp_path)
    gate = ["--max-ssi", "0.99", "--device", "cpu", "-q"]
    for args in (
        ["score", str(adapter), "-o", str(weights), "--force", "-f", "json"],
        ["score", str(weights), "-o", str(adapter / "adapter_config.json"), "--force"],
        ["score", str(adapter), "-o", str(tmp_path / "link"), "--force"],
        ["score", str(adapter), "-o", str(adapter / "new-report.json")],
        ["check", str(adapter), *gate, "--markdown-output", str(adapter / "r.md")],
        [
            "check",
            str(adapter),
            *gate,
            "--baseline",
            str(baseline),
            "--max-increase",
            "0.5",
            "--sarif-output",
            str(baseline / "adapter_config.json"),
            "--force",
        ],
        ["check", str(adapter), *gate, "-o", str(tmp_path / "same.md"), "--markdown-output", str(tmp_path / "same.md")],
        ["scan", str(store), "-o", str(store / "member" / "scan.json")],
        ["admit", str(adapter), "--store", str(tmp_path / "s2"), *gate, "-o", str(weights), "--force"],
        ["admit", str(adapter), "--store", str(tmp_path / "s2"), *gate, "--audit-log", str(adapter / "log.jsonl")],
        ["admit", str(adapter), "--store", str(tmp_path / "s2"), *gate, "--quarantine", str(adapter / "q")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "Traceback" not in result.output
    assert tree(tmp_path) == before


def test_an_output_that_appears_while_the_command_runs_is_not_replaced(tmp_path, monkeypatch):
    import s3lora_cli.cli.output as output_mod

    adapter = make_adapter(tmp_path / "adapter")
    out = tmp_path / "report.json"
    real_check = output_mod.check_output

    def someone_else_writes(output, force):
        real_check(output, force)
        if output == out:
            out.write_text("theirs")

    monkeypatch.setattr(output_mod, "check_output", someone_else_writes)
    result = runner.invoke(app, ["score", str(adapter), "-o", str(out), "-f", "json", "-q", "--device", "cpu"])
    one_line_error(result, EXIT_USAGE, str(out), "exists", "--force")
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "report.json"]


def test_scan_of_a_weights_file_writes_nothing_beside_it(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    before = tree(tmp_path)
    result = runner.invoke(app, ["scan", str(adapter / "adapter_model.safetensors"), "-q", "--device", "cpu"])
    assert result.exit_code == EXIT_OK, result.output
    assert tree(tmp_path) == before


# --- the environment's errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_environment_errors_are_one_line_naming_the_path(tmp_path, monkeypatch, code):
    adapter = make_adapter(tmp_path / "adapter")
    out = tmp_path / "report.json"
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def failing_mkdir(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(durable, "os", FaultyOs(open=failing_open, mkdir=failing_mkdir))
    result = runner.invoke(app, ["score", str(adapter), "-o", str(out), "-f", "json", "-q", "--device", "cpu"])
    one_line_error(result, EXIT_RUNTIME, str(tmp_path), os.strerror(code))
    assert not out.exists()
    result = prune_cli(adapter, tmp_path / "pruned")
    one_line_error(result, EXIT_RUNTIME, "pruned", os.strerror(code), "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_read_only_store_is_an_environment_error(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == store or self == store:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(
        durable,
        "os",
        FaultyOs(open=lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS), str(a[0])))),
    )
    result = runner.invoke(
        app,
        [
            "admit",
            str(make_adapter(tmp_path / "a")),
            "--store",
            str(store),
            "--max-ssi",
            "0.99",
            "-q",
            "--device",
            "cpu",
        ],
    )
    one_line_error(result, EXIT_RUNTIME, str(store), "Read-only file system")


def test_a_name_too_long_is_an_environment_error(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    result = runner.invoke(app, ["score", str(adapter), "-o", str(tmp_path / ("x" * 300)), "-q", "--device", "cpu"])
    one_line_error(result, EXIT_RUNTIME, "File name too long", "shorter name")
    result = prune_cli(adapter, tmp_path / ("y" * 300))
    one_line_error(result, EXIT_RUNTIME, "File name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_long_name_that_fits_is_written_and_its_temporary_name_fits_too(tmp_path):
    """A 240-character output name fits NAME_MAX (255) but not with a temporary prefix and suffix around it: the
    temporary name holds the first characters and a hash. A replaced directory of such a name, left by a swap cut
    short, cannot be traced back to its name, so it is left for the user, never removed."""
    adapter = make_adapter(tmp_path / "adapter")
    name = "r" * 240
    result = runner.invoke(
        app, ["score", str(adapter), "-o", str(tmp_path / name), "-f", "json", "-q", "--device", "cpu"]
    )
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads((tmp_path / name).read_text())["layers"]
    old = tmp_path / f".{durable.base_of(name)}.{DEAD_PID}-0000abcd.s3lora-old"
    old.mkdir()
    durable.clean_stale(tmp_path)
    assert old.is_dir()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs, where the machine lets this process mount one (root on Linux); skipped elsewhere: the
    patched-os tests above inject the same ENOSPC everywhere."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_file_system(tmp_path, tiny_tmpfs):
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "notes.bin").write_bytes(os.urandom(2 << 20))  # more than the tmpfs holds
    result = prune_cli(adapter, tiny_tmpfs / "pruned")
    one_line_error(result, EXIT_RUNTIME, str(tiny_tmpfs / "pruned"), "No space left on device", "nothing was written")
    assert list(tiny_tmpfs.iterdir()) == []
    store = tiny_tmpfs / "store"
    result = runner.invoke(
        app, ["admit", str(adapter), "--store", str(store), "--max-ssi", "0.99", "-q", "--device", "cpu"]
    )
    one_line_error(result, EXIT_RUNTIME, "No space left on device")
    assert discover(store) == [] and not [p for p in store.iterdir() if p.name.endswith(".s3lora-tmp")]


# --- stale temporary paths and the --force swap -------------------------------------------------------------------


def test_what_killed_runs_left_is_cleaned_by_the_next_run(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    out = tmp_path / "pruned"
    stale_dir = tmp_path / f".pruned.{DEAD_PID}-0000abcd.s3lora-tmp"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".report.json.{DEAD_PID}-0000abcd.s3lora-tmp"
    stale_file.write_text("{")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_dir = tmp_path / f".pruned.{live.pid}-0000abcd.s3lora-tmp"  # a run still at work: left alone
        live_dir.mkdir()
        assert prune_cli(adapter, out).exit_code == 0
        assert (
            runner.invoke(
                app, ["score", str(adapter), "-o", str(tmp_path / "report.json"), "-q", "--device", "cpu"]
            ).exit_code
            == 0
        )
        assert not stale_dir.exists() and not stale_file.exists() and live_dir.exists()
    finally:
        live.kill()
        live.wait()


def test_a_swap_cut_short_gets_its_old_output_back(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, --force renames the old output aside and the new one into place; a run killed
    between the two leaves only the aside copy, which the next run that writes there renames back first."""
    adapter = make_adapter(tmp_path / "adapter")
    out = tmp_path / "pruned"
    assert prune_cli(adapter, out).exit_code == 0
    old = tree(out)
    os.rename(out, tmp_path / f".pruned.{DEAD_PID}-0000abcd.s3lora-old")  # the state a kill there leaves
    result = runner.invoke(app, ["prune", str(adapter), "--tau", "2", "-o", str(out), "-q", "--device", "cpu"])
    assert result.exit_code == EXIT_USAGE and "exists" in result.stderr  # the old output is back, and kept
    assert tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "pruned"]
    monkeypatch.setattr(durable, "_renameat2", lambda *args: False)  # the fallback, completed this time
    result = runner.invoke(
        app, ["prune", str(adapter), "--tau", "2", "-o", str(out), "--force", "-q", "--device", "cpu"]
    )
    assert result.exit_code == EXIT_OK and tree(out) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "pruned"]


def test_the_exchange_is_atomic_where_linux_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not durable._renameat2(a, b, durable._RENAME_EXCHANGE):
        pytest.skip("no renameat2 RENAME_EXCHANGE here (the fallback is tested above)")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
    with pytest.raises(FileExistsError):
        durable.rename_noreplace(a, b)


# --- kills by signal ----------------------------------------------------------------------------------------------

SLOW_CHILD = """
import hashlib, sys, time
import s3lora_cli.adapters.writer as writer
import s3lora_cli.adapters.files as files
writer.BLOCK_BYTES = 1 << 20

class Slow:
    def __init__(self):
        self.h = hashlib.sha256()
    def update(self, block):
        time.sleep(0.004)
        self.h.update(block)
    def hexdigest(self):
        return self.h.hexdigest()

writer.hashlib = type("H", (), {"sha256": staticmethod(Slow)})
real_copy = files.copy_file
def slow_copy(src, dst, size):
    time.sleep(0.05)
    real_copy(src, dst, size)
files.copy_file = slow_copy
from s3lora_cli.cli import run
sys.argv = ["s3lora", *sys.argv[1:]]
run()
"""


def big_adapter(path: Path, mib: int) -> Path:
    """A small LoRA layer beside a ``mib`` MiB non-LoRA tensor (copied by prune untouched), plus other files."""
    import torch

    a, b = random_factors(8, 8, 2, 0)
    tensors = {
        f"model.layers.{i}.q_proj.lora_{ab}.weight": t
        for i in range(4)
        for ab, t in (("A", (a if i % 2 else b.T) * (i + 1)), ("B", (b if i % 2 else a.T) * (i + 1)))
    }
    tensors["model.embed_tokens.weight"] = torch.arange(mib << 18, dtype=torch.float32)
    write_adapter(path, tensors, config_dict(r=2))
    for i in range(4):
        (path / f"notes-{i}.txt").write_text(f"note {i}\n")
    return path


def owned(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith((".s3lora-tmp", ".s3lora-old"))]


def wait_for(condition, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.002)
    return False


def weights_written(directory: Path, at_least: int):
    def check():
        for tmp in owned(directory):
            weights = tmp / "adapter_model.safetensors"
            if weights.exists() and weights.stat().st_size >= at_least:
                return True
        return False

    return check


@pytest.mark.skipif(sys.platform != "linux", reason="signals and renameat2 as on Linux")
def test_prune_force_killed_at_several_points(tmp_path):
    """`prune --force` over an existing output, killed at several points of the copy (SIGTERM: the temporary
    directory just made, a third of the weights written; SIGKILL: two thirds written): the output
    is always the old one, whole; SIGTERM exits 143 and leaves no temporary directory; what SIGKILL leaves, the
    next run removes."""
    from s3lora_cli.pruning import prune_adapter
    from s3lora_cli.scoring import ScoreOptions
    from s3lora_cli.selection import Selection

    adapter = big_adapter(tmp_path / "adapter", 24)
    out = tmp_path / "pruned"
    prune_adapter(adapter, out, Selection.of(tau=1), options=ScoreOptions(device="cpu"))
    old = tree(out)
    size = (out / "adapter_model.safetensors").stat().st_size
    made = lambda: bool(owned(tmp_path))  # noqa: E731
    third, two_thirds = weights_written(tmp_path, size // 3), weights_written(tmp_path, 2 * size // 3)
    for sig, point, reached in (
        (signal.SIGTERM, "temporary directory made", made),
        (signal.SIGTERM, "a third of the weights", third),
        (signal.SIGKILL, "two thirds of the weights", two_thirds),
    ):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_CHILD,
                "prune",
                str(adapter),
                "--tau",
                "2",
                "-o",
                str(out),
                "--force",
                "-q",
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert wait_for(reached), point
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
        assert tree(out) == old, (sig, point)
        if sig == signal.SIGTERM:
            assert child.returncode == 128 + signal.SIGTERM, (point, err)
            assert "interrupted" in err and "SIGTERM" in err and "Traceback" not in err, err
            assert owned(tmp_path) == [], point
        else:
            assert child.returncode == -signal.SIGKILL and owned(tmp_path), point
    prune_adapter(adapter, out, Selection.of(tau=2), options=ScoreOptions(device="cpu"), force=True)
    assert tree(out) != old and owned(tmp_path) == []


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on Linux")
def test_admit_killed_mid_copy_admits_nothing(tmp_path):
    adapter = big_adapter(tmp_path / "adapter", 8)
    store = tmp_path / "store"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_CHILD,
                "admit",
                str(adapter),
                "--store",
                str(store),
                "--max-ssi",
                "0.999",
                "-q",
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert wait_for(lambda: store.is_dir() and bool(owned(store)))
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
        assert child.returncode in (128 + sig, -sig), err
        assert discover(store) == [] and not (store / AUDIT_LOG_NAME).exists()
    assert admit_adapter(adapter, store, GatePolicy(max_ssi=0.999), device="cpu").admitted
    assert len(discover(store)) == 1 and owned(store) == [] and len(read_audit_log(store / AUDIT_LOG_NAME)) == 1


def test_an_interruption_during_the_commit_waits_and_is_told_truly(tmp_path, monkeypatch):
    """SIGINT arriving while admit commits (between the record and the rename) is held back until both are done;
    the message then says the adapter was admitted and logged, not that nothing was written."""
    real_install = durable.install_dir

    def install_then_interrupt(tmp, destination, replace):
        os.kill(os.getpid(), signal.SIGINT)  # held: delivered when the commit ends
        return real_install(tmp, destination, replace=replace)

    monkeypatch.setattr(durable, "install_dir", install_then_interrupt)
    store = tmp_path / "store"
    args = ["admit", str(make_adapter(tmp_path / "a")), "--store", str(store), "--max-ssi", "0.99", "-q"]
    # Python's own SIGINT handler: a process started in the background by a non-interactive shell (nohup ... &)
    # inherits SIGINT ignored, and an ignored signal is rightly never delivered
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = runner.invoke(app, [*args, "--device", "cpu"])
    finally:
        signal.signal(signal.SIGINT, previous)
    message = one_line_error(result, EXIT_SIGINT, "interrupted after", "admitted", "logged")
    assert "nothing was written" not in message
    assert len(discover(store)) == 1 and len(read_audit_log(store / AUDIT_LOG_NAME)) == 1


# --- a quarantine shared by two stores ----------------------------------------------------------------------------


def test_a_shared_quarantine_keeps_other_runs_copies(tmp_path):
    """Two stores with one --quarantine: an admit of one never removes the other's copy in progress (here a
    temporary directory this live process owns), and concurrent refusals into it both land whole."""
    quarantine = tmp_path / "rejected"
    quarantine.mkdir()
    in_progress = durable.make_temp_dir(quarantine, "other-entry")
    (in_progress / "adapter_model.safetensors").write_bytes(b"being copied")
    sharp = [make_adapter(tmp_path / f"sharp{i}", i, sharp=True) for i in (1, 2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3lora_cli",
                "admit",
                str(adapter),
                "--store",
                str(tmp_path / f"store{i}"),
                "--quarantine",
                str(quarantine),
                "--max-ssi",
                "0.9",
                "-q",
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, adapter in enumerate(sharp)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_GATE_FAILED, EXIT_GATE_FAILED], outs
    assert in_progress.is_dir() and (in_progress / "adapter_model.safetensors").read_bytes() == b"being copied"
    entries = sorted(p for p in quarantine.iterdir() if not p.name.startswith("."))
    assert [p.name.split("-")[0] for p in entries] == ["sharp1", "sharp2"]
    for entry, adapter in zip(entries, sharp, strict=True):
        assert (entry / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()
    durable.discard(in_progress)


# --- a layer out of range -----------------------------------------------------------------------------------------


def test_a_layer_beyond_float32_is_scored_in_float64_exactly(tmp_path):
    """A and B scaled by 1e19 (dW ~ 1e38, past float32): scored in float64 with the spec's own constants (nothing
    rescaled), equal to the dense float64 reference on the same dW to the suite's float64 tolerance (1e-9); the
    other layers are scored as usual. Factors past float64's range are that layer's error; the run goes on."""
    from reference import reference

    from s3lora_cli import score_adapter
    from s3lora_cli.scoring import FLOAT64_NOTE

    a, b = random_factors(16, 12, 4, 1)
    tensors = {
        **layer_tensors("model.layers.0.q_proj", a * 1e19, b * 1e19),
        **layer_tensors("model.layers.1.q_proj", *random_factors(16, 12, 4, 2)),
        **layer_tensors("model.layers.2.q_proj", a.double() * 1e100, b.double() * 1e100),
    }
    path = write_adapter(tmp_path / "adapter", {k: v for k, v in tensors.items() if "layers.2" not in k})
    report = {s.module: s for s in score_adapter(path).layers}
    big = report["model.layers.0.q_proj"]
    dw = 2.0 * (b * 1e19).double() @ (a * 1e19).double()  # scaling lora_alpha / r = 8 / 4, as stored in float32
    assert FLOAT64_NOTE in big.notes and big.error is None
    assert big.ssi == pytest.approx(reference(dw.numpy(), rank=4).ssi, rel=1e-9)
    assert 0.5 < big.ssi < 0.8  # a spread spectrum, where a wrong fit would show
    assert report["model.layers.1.q_proj"].ssi is not None and not report["model.layers.1.q_proj"].notes
    # stored as float64 beyond what float64 scores exactly: this layer's error, the others scored
    from safetensors.torch import save_file

    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    report = {s.module: s for s in score_adapter(path).layers}
    assert report["model.layers.2.q_proj"].ssi is None and "out of range" in report["model.layers.2.q_proj"].error
    assert report["model.layers.0.q_proj"].ssi == pytest.approx(big.ssi, rel=1e-12)
    result = runner.invoke(app, ["check", str(path), "--max-ssi", "0.999", "-f", "json", "-q", "--device", "cpu"])
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    failing = {v["module"] for v in json.loads(result.stdout)["gate"]["violations"] if v["fails"]}
    assert failing == {"model.layers.2.q_proj"}
    assert all(math.isfinite(x) for x in report["model.layers.0.q_proj"].sigma)


# --- rank_pattern / alpha_pattern at scale ------------------------------------------------------------------------


def test_many_pattern_keys_cost_no_regex_per_key(tmp_path, monkeypatch):
    """5,000 module-name keys: every module is matched through the trie, with no regular expression tried per
    key (the cost does not multiply modules by keys), and the first matching key wins as in PEFT."""
    from s3lora_cli import score_adapter
    from s3lora_cli.adapters import config as config_mod

    keys = {f"model.layers.{i}.mlp.experts.{j}.up_proj": 4 for i in range(50) for j in range(100)}
    keys["layers.0.self_attn.q_proj"] = 4
    alphas = {**{f"model.layers.{i}.other.{j}": 1.0 for i in range(50) for j in range(100)}, "q_proj": 32.0}
    path = make_adapter(tmp_path / "adapter", rank_pattern=keys, alpha_pattern=alphas)
    compiled = []
    real = config_mod._compiled
    monkeypatch.setattr(config_mod, "_compiled", lambda key: compiled.append(key) or real(key))
    report = score_adapter(path)
    assert compiled == []
    q = next(s for s in report.layers if s.module.endswith("q_proj"))
    assert q.layer.lora_alpha == 32.0 and q.layer.scaling == 8.0


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(
        st.one_of(
            st.text("ab._", max_size=5), st.sampled_from([r"a\.b", r"(a|b)_", r"\w+", r"a.*", r"b\.", r"[ab]\._?"])
        ),
        max_size=6,
    ),
    module=st.text("ab._\n", max_size=8),
)
def test_the_matcher_is_peft_s_first_match(keys, module):
    """PatternMatcher (a trie for module-name keys, the regular expressions tried in order) against the literal
    PEFT loop over every key: the same key, for names with dots, wildcards and a newline."""
    import re

    from s3lora_cli.adapters.config import PatternMatcher

    literal = next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)
    assert PatternMatcher(keys).match(module) == literal


def test_too_many_regular_expression_keys_are_refused(tmp_path):
    keys = {rf"layers\.{i}\..*q_proj": 4 for i in range(100)}
    path = make_adapter(tmp_path / "adapter", rank_pattern=keys)
    one_line_error(
        runner.invoke(app, ["score", str(path), "-q", "--device", "cpu"]),
        EXIT_INPUT,
        "100 keys that are regular expressions",
        "at most 64",
    )


# --- memory: prune streams ----------------------------------------------------------------------------------------

PRUNE_STREAM = """
import resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
from s3lora_cli.cli import app
app(["prune", sys.argv[1], "-o", sys.argv[2], "--tau", "1", "--allow-large", "-q", "--device", "cpu", "--format",
     "json"])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA bounds mmap only on Linux")
def test_prune_streams_a_file_larger_than_the_memory_limit(tmp_path):
    """A 512 MiB adapter (a sparse non-LoRA tensor beside one layer) is pruned in a process whose data segment is
    limited to 384 MiB, as `score` is in test_hostile: the weights are streamed block by block, never held whole;
    the untouched tensor's bytes are identical, the pruned lora_B is zeros."""
    import torch
    from safetensors import safe_open

    a, b = random_factors(8, 8, 2, 0)
    huge = 2**29 // 4
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{stem}.lora_A.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
        f"{stem}.lora_B.weight": {"dtype": "F32", "shape": [8, 2], "data_offsets": [64, 128]},
        "base_model.model.model.embed_tokens.weight": {
            "dtype": "F32",
            "shape": [huge],
            "data_offsets": [128, 128 + 4 * huge],
        },
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config_dict(r=2)))
    with open(adapter / "adapter_model.safetensors", "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + a.numpy().tobytes() + b.numpy().tobytes())
        fh.seek(4 * huge - 4, 1)
        fh.write(b"\x01\x02\x03\x04")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", PRUNE_STREAM, str(adapter), str(out), str(384 * 2**20)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p["module"] for p in json.loads(result.stdout)["pruned"]] == ["model.layers.0.self_attn.q_proj"]

    def tensor_digest(path: Path, name: str) -> str:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            entry = json.loads(fh.read(n))[name]
            begin, end = entry["data_offsets"]
            fh.seek(8 + n + begin)
            digest, left = hashlib.sha256(), end - begin
            while left:
                block = fh.read(min(left, 1 << 24))
                digest.update(block)
                left -= len(block)
            return digest.hexdigest()

    name = "base_model.model.model.embed_tokens.weight"
    assert tensor_digest(out / "adapter_model.safetensors", name) == tensor_digest(
        adapter / "adapter_model.safetensors", name
    )
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor(f"{stem}.lora_A.weight"), a)
        assert not fh.get_tensor(f"{stem}.lora_B.weight").any()


def test_warnings_module_is_quiet_on_a_whole_log(tmp_path):
    store = tmp_path / "store"
    admit_adapter(make_adapter(tmp_path / "a"), store, POLICY, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_audit_log(store / AUDIT_LOG_NAME)) == 1
