"""``s3lora adapt`` end to end on a tiny model: trigger, cluster, demo-tasks; bad task lines, a missing model,
an output that is an input, policy files, a corrupt or existing state, and resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
from tiny_lm import save_tiny_causal_lm  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from s3lora_cli import cli  # noqa: E402
from s3lora_cli.adapt.demo import FAMILIES, demo_tasks  # noqa: E402
from s3lora_cli.adapt.policy import BufferPolicy  # noqa: E402
from s3lora_cli.adapt.state import STATE_FILE, load_state, run_buffer, state_json  # noqa: E402

runner = CliRunner()
WORDS = " ".join(p + " " + a for f in FAMILIES for p, a in f.pairs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("model"), texts=[WORDS], layers=1, seed=0)


def write_tasks(path, count=6, bad=False):
    lines = [json.dumps(t) for t in demo_tasks(seed=1, warmup=2, per_family=1)[:count]]
    if bad:
        lines.insert(2, "{not json")
        lines.insert(4, json.dumps({"prompt": "no answer"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trigger_writes_every_sample_and_skips_bad_lines_with_their_number(tmp_path, model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl", bad=True)
    out = tmp_path / "triggered.jsonl"
    result = runner.invoke(
        cli.app,
        [
            "adapt",
            "trigger",
            "--model",
            str(model_dir),
            "--tasks",
            str(tasks),
            "-o",
            str(out),
            "--max-new-tokens",
            "3",
            "--warmup",
            "2",
        ],
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4, 6, 7, 8]
    assert all(r["task"]["family"] for r in records)  # carried through verbatim
    assert "line 3: not JSON" in result.stderr and "line 5: 'answer' must be" in result.stderr
    assert "2 bad line(s) skipped" in result.stderr and result.stdout == ""
    again = runner.invoke(
        cli.app, ["adapt", "trigger", "--model", str(model_dir), "--tasks", str(tasks), "-o", str(out)]
    )
    assert again.exit_code == 2 and "--force" in again.stderr


def test_strict_stops_at_the_first_bad_line_with_exit_3(tmp_path, model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl", bad=True)
    result = runner.invoke(
        cli.app, ["adapt", "trigger", "--model", str(model_dir), "--tasks", str(tasks), "--strict", "-q"]
    )
    assert result.exit_code == 3 and "line 3: not JSON" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_model_or_task_file_exits_3_and_an_output_onto_the_input_exits_2(tmp_path, model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl")
    missing = runner.invoke(cli.app, ["adapt", "trigger", "--model", str(tmp_path / "absent"), "--tasks", str(tasks)])
    assert missing.exit_code == 3 and "no such model" in missing.stderr
    no_tasks = runner.invoke(
        cli.app, ["adapt", "trigger", "--model", str(model_dir), "--tasks", str(tmp_path / "none.jsonl")]
    )
    assert no_tasks.exit_code == 3 and "no such file" in no_tasks.stderr
    onto = runner.invoke(
        cli.app, ["adapt", "trigger", "--model", str(model_dir), "--tasks", str(tasks), "-o", str(tasks), "--force"]
    )
    assert onto.exit_code == 2 and "is an input" in onto.stderr
    assert tasks.read_text().count("\n") == 6


def test_the_policy_file_sets_the_threshold_and_flags_win(tmp_path, model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl", count=4)
    policy = tmp_path / "policy.toml"
    policy.write_text("[tool.s3lora.adapt]\nthreshold = 0.0\nwarmup = 0\n")
    result = runner.invoke(
        cli.app,
        [
            "adapt",
            "trigger",
            "--model",
            str(model_dir),
            "--tasks",
            str(tasks),
            "--policy",
            str(policy),
            "--max-new-tokens",
            "2",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert all(json.loads(line)["triggered"] for line in result.stdout.splitlines())  # score >= 0 always
    high = runner.invoke(
        cli.app,
        [
            "adapt",
            "trigger",
            "--model",
            str(model_dir),
            "--tasks",
            str(tasks),
            "--policy",
            str(policy),
            "--threshold",
            "2",
            "--max-new-tokens",
            "2",
            "-q",
        ],
    )
    assert not any(json.loads(line)["triggered"] for line in high.stdout.splitlines())  # score <= 1.01
    policy.write_text("[tool.s3lora.adapt]\nthreshhold = 0.4\n")
    typo = runner.invoke(
        cli.app, ["adapt", "trigger", "--model", str(model_dir), "--tasks", str(tasks), "--policy", str(policy)]
    )
    assert typo.exit_code == 2 and "unknown adapt key 'threshhold'" in typo.stderr
    policy.write_text('[tool.s3lora.adapt]\ncluster-selection = "dense"\n')
    wrong = runner.invoke(
        cli.app,
        [
            "adapt",
            "cluster",
            str(tasks),
            "--state",
            str(tmp_path / "s"),
            "--model",
            str(model_dir),
            "--policy",
            str(policy),
        ],
    )
    assert wrong.exit_code == 2 and "expected one of eom, leaf" in wrong.stderr


def test_the_gate_ignores_the_adapt_table_of_pyproject(tmp_path):
    from s3lora_cli.gate import resolve_policy

    (tmp_path / "pyproject.toml").write_text("[tool.s3lora]\nmax-ssi = 0.3\n[tool.s3lora.adapt]\nwarmup = 5\n")
    assert resolve_policy({}, cwd=tmp_path).max_ssi == 0.3


def test_the_store_policy_sets_the_search_the_gate_and_routing_and_flags_win(tmp_path):
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.adapt.train import Candidate, TrainSettings

    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[tool.s3lora.adapt]\nr = [4, 8]\nlora-alpha = 16\nlearning-rate = [1e-3, 3e-3]\nepochs = 6\n"
        'target-modules = ["q_proj", "o_proj"]\nfraction = 0.2\nfloor = 0.7\nroute-threshold = 0.5\nmin-new = 3\n'
    )
    store = resolve_adapt_policy({}, policy).store
    train = TrainSettings.of(store)
    assert train.candidates == tuple(Candidate(r, 16, lr, 6) for r in (4, 8) for lr in (1e-3, 3e-3))
    assert train.target_modules == ("q_proj", "o_proj")
    assert (store.fraction, store.tau, store.floor, store.route_threshold, store.min_new) == (0.2, None, 0.7, 0.5, 3)
    # each flag replaces its own dimension; a pruning flag replaces the file's choice of what to prune
    flags = {"r": 16, "learning_rate": 1e-2, "tau": 3, "target_modules": "v_proj"}
    store = resolve_adapt_policy(flags, policy).store
    assert TrainSettings.of(store).candidates == (Candidate(16, 16, 1e-2, 6),)
    assert (store.tau, store.fraction, store.target_modules) == (3, None, ("v_proj",))
    # a named search replaces the file's four lists; flags still win over it
    paper = resolve_adapt_policy({"epochs": 2}, policy, search="paper").store
    assert len(TrainSettings.of(paper).candidates) == 8 and paper.epochs == (2,) and paper.r == (4, 8)
    # pyproject's table when no file is given, and the defaults without one
    (tmp_path / "pyproject.toml").write_text("[tool.s3lora]\n[tool.s3lora.adapt]\nfloor = 0.25\n")
    assert resolve_adapt_policy({}, cwd=tmp_path).store.floor == 0.25
    assert TrainSettings.of(resolve_adapt_policy({}, cwd=tmp_path / "x").store) == TrainSettings()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("r = []", "give at least one value"),
        ("r = [4, 0]", "out of range"),
        ("learning-rate = 2.0", "out of range"),
        ('epochs = "many"', "expected an integer"),
        ("target-modules = []", "at least one module"),
        ("tau = 3\nfraction = 0.1", "one of tau, prune-threshold and fraction"),
        ("floor = 1.5", "out of range"),
    ],
)
def test_a_bad_store_policy_is_a_usage_error(tmp_path, table, message):
    from s3lora_cli.adapt.policy import resolve_adapt_policy
    from s3lora_cli.errors import UsageError

    policy = tmp_path / "policy.toml"
    policy.write_text(f"[tool.s3lora.adapt]\n{table}\n")
    with pytest.raises(UsageError, match=message):
        resolve_adapt_policy({}, policy)
    with pytest.raises(UsageError, match="--search 'huge'"):
        resolve_adapt_policy({}, None, cwd=tmp_path, search="huge")


def test_demo_tasks_cli_writes_the_stream_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "tasks.jsonl"
    assert runner.invoke(cli.app, ["adapt", "demo-tasks", "-o", str(out), "--seed", "3"]).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == demo_tasks(seed=3)
    assert runner.invoke(cli.app, ["adapt", "demo-tasks", "-o", str(out)]).exit_code == 2


def test_demo_stream_starts_with_its_warm_up_of_known_families_and_holds_every_family():
    tasks = demo_tasks(seed=0, warmup=20, per_family=25)
    known = {f.name for f in FAMILIES if f.in_distribution}
    assert all(t["family"] in known for t in tasks[:20])
    assert {t["family"] for t in tasks[20:]} == {f.name for f in FAMILIES} and len(tasks) == 20 + 25 * len(FAMILIES)
    assert demo_tasks(seed=0) == tasks and demo_tasks(seed=1) != tasks


# --- the buffer's state directory -------------------------------------------------------------------------


class TableEmbedder:
    """Hand-made embeddings: each text's vector is its blob's axis plus seeded noise (blob from its first word);
    raises KeyboardInterrupt at the call numbered ``stop_at``, like a run stopped there."""

    name = "table"

    def __init__(self, stop_at: int | None = None):
        self.calls = 0
        self.stop_at = stop_at

    def __call__(self, texts):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        out = []
        for text in texts:
            blob = {"red": 0, "green": 1, "blue": 2}[text.split()[0]]
            rng = np.random.default_rng(sum(map(ord, text)))
            out.append(np.eye(8)[blob] * 3 + 0.05 * rng.normal(size=8))
        return np.array(out, dtype=np.float32)


def triggered_lines(count=60):
    lines = []
    for i in range(count):
        colour = ["red", "green", "blue"][i % 3]
        record = {
            "line": i + 1,
            "task": {"prompt": f"{colour} question {i}", "answer": f"answer {i}", "family": colour},
            "triggered": i % 5 != 4,
            "score": 0.7,
        }
        lines.append(json.dumps(record) + "\n")
    return lines


POLICY = BufferPolicy(min_buffer=20, min_cluster_size=4, min_cluster=6)


def test_a_resumed_run_gives_the_clusters_of_an_uninterrupted_one(tmp_path):
    lines = triggered_lines()
    whole = tmp_path / "whole"
    whole.mkdir()
    summary = run_buffer(lines, whole, POLICY, TableEmbedder())
    assert summary.stabilisations >= 1 and summary.handed_off
    for stop_at in (3, 21, 30):  # before, at and after the first stabilisation
        part = tmp_path / f"part{stop_at}"
        part.mkdir()
        with pytest.raises(KeyboardInterrupt):
            run_buffer(lines, part, POLICY, TableEmbedder(stop_at=stop_at))
        resumed = run_buffer(lines, part, POLICY, TableEmbedder(), resume=True)
        assert (part / STATE_FILE).read_text() == (whole / STATE_FILE).read_text()
        assert resumed.handed_off == summary.handed_off
        for f in (whole / "clusters").iterdir():
            assert (part / "clusters" / f.name).read_text() == f.read_text()


def test_handed_off_clusters_are_pure_and_their_manifest_gives_the_centre(tmp_path):
    run_buffer(triggered_lines(), tmp_path, POLICY, TableEmbedder())
    manifest = json.loads((tmp_path / "clusters" / "manifest.json").read_text())
    assert len(manifest["clusters"]) == 3
    for entry in manifest["clusters"]:
        members = [json.loads(line) for line in (tmp_path / "clusters" / entry["file"]).read_text().splitlines()]
        assert len(members) == entry["size"] >= POLICY.min_cluster
        assert len({m["family"] for m in members}) == 1
        assert len(entry["centre"]) == 8 and len(entry["origin"]) == 8


def test_resume_with_another_input_exits_3(tmp_path):
    from s3lora_cli.errors import AdapterInputError

    lines = triggered_lines()
    with pytest.raises(KeyboardInterrupt):
        run_buffer(lines, tmp_path, POLICY, TableEmbedder(stop_at=10))
    lines[0] = lines[0].replace("question 0", "question zero")
    with pytest.raises(AdapterInputError, match="not those the state"):
        run_buffer(lines, tmp_path, POLICY, TableEmbedder(), resume=True)


def test_the_state_round_trips_exactly(tmp_path):
    run_buffer(triggered_lines(), tmp_path, POLICY, TableEmbedder())
    state, consumed, digest = load_state(tmp_path)
    assert state_json(state, consumed, digest) == (tmp_path / STATE_FILE).read_text()


def test_cluster_cli_corrupt_existing_and_resumed_state(tmp_path, model_dir):
    triggered = tmp_path / "triggered.jsonl"
    triggered.write_text("".join(triggered_lines(8)) + "oops\n")
    state = tmp_path / "buffer"
    args = ["adapt", "cluster", str(triggered), "--state", str(state), "--model", str(model_dir), "-q"]
    first = runner.invoke(cli.app, args)
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["lines"] == 9 and doc["triggered"] == 7 and doc["bad_lines"] == 1
    assert runner.invoke(cli.app, args).exit_code == 2  # a state exists: --resume or --force
    assert runner.invoke(cli.app, args + ["--strict", "--force"]).exit_code == 3
    assert runner.invoke(cli.app, args + ["--force"]).exit_code == 0
    assert runner.invoke(cli.app, args + ["--resume"]).exit_code == 0
    (state / STATE_FILE).write_text('{"schema_version": 1, "buckets": ')
    corrupt = runner.invoke(cli.app, args + ["--resume"])
    assert corrupt.exit_code == 3 and "state.json: corrupt buffer state" in corrupt.stderr
    assert (state / STATE_FILE).read_text() == '{"schema_version": 1, "buckets": '  # left as it was
    other = runner.invoke(
        cli.app,
        ["adapt", "cluster", str(triggered), "--state", str(state), "--embedder", str(tmp_path / "absent"), "--resume"],
    )
    assert other.exit_code == 3


def test_an_interrupted_cluster_command_says_how_to_resume_and_resumes_to_the_same_state(
    tmp_path, model_dir, monkeypatch
):
    import s3lora_cli.adapt.embedding as embedding

    triggered = tmp_path / "triggered.jsonl"
    triggered.write_text("".join(triggered_lines()))
    base = ["adapt", "cluster", str(triggered), "--model", str(model_dir), "--min-buffer", "20", "-q"]
    monkeypatch.setattr(embedding, "model_embedder", lambda lm: TableEmbedder())
    assert runner.invoke(cli.app, base + ["--state", str(tmp_path / "whole")]).exit_code == 0
    monkeypatch.setattr(embedding, "model_embedder", lambda lm: TableEmbedder(stop_at=25))
    stopped = runner.invoke(cli.app, base + ["--state", str(tmp_path / "part")])
    assert stopped.exit_code == 130 and "--resume continues it" in stopped.stderr
    monkeypatch.setattr(embedding, "model_embedder", lambda lm: TableEmbedder())
    assert runner.invoke(cli.app, base + ["--state", str(tmp_path / "part"), "--resume"]).exit_code == 0
    assert (tmp_path / "part" / STATE_FILE).read_text() == (tmp_path / "whole" / STATE_FILE).read_text()


def test_assign_threshold_decides_which_later_samples_join_a_cluster(tmp_path, model_dir, monkeypatch):
    import s3lora_cli.adapt.embedding as embedding

    triggered = tmp_path / "triggered.jsonl"
    triggered.write_text("".join(triggered_lines()))
    monkeypatch.setattr(embedding, "model_embedder", lambda lm: TableEmbedder())
    base = ["adapt", "cluster", str(triggered), "--model", str(model_dir), "--min-buffer", "20", "-q"]
    docs = {}
    for name, extra in (("default", []), ("strict", ["--assign-threshold", "1"])):
        result = runner.invoke(cli.app, base + ["--state", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.stderr
        docs[name] = json.loads(result.stdout)
    # Each later sample lies near its blob's cluster (cosine near 1): the default threshold (0.6) takes every one in,
    # so the buffer is empty and never clustered again; a threshold of 1 takes none, so they wait and are clustered
    # again in the buffer.
    assert docs["default"]["buffered"] == 0 and docs["default"]["reclusterings"] == 2
    assert docs["strict"]["buffered"] > 0 and docs["strict"]["reclusterings"] > 2
    bad = runner.invoke(cli.app, base + ["--state", str(tmp_path / "bad"), "--assign-threshold", "-2"])
    assert bad.exit_code == 2 and "--assign-threshold" in bad.stderr


def test_trigger_reads_stdin_and_a_state_directory_with_hand_off_files_is_not_overwritten(tmp_path, model_dir):
    tasks = write_tasks(tmp_path / "tasks.jsonl", count=3)
    piped = runner.invoke(
        cli.app,
        ["adapt", "trigger", "--model", str(model_dir), "--tasks", "-", "--max-new-tokens", "2", "-q"],
        input=tasks.read_text(),
    )
    assert piped.exit_code == 0, piped.stderr
    assert [json.loads(line)["line"] for line in piped.stdout.splitlines()] == [1, 2, 3]
    (tmp_path / "buffer" / "clusters").mkdir(parents=True)
    (tmp_path / "buffer" / "clusters" / "cluster-0001.jsonl").write_text("mine\n")
    result = runner.invoke(
        cli.app, ["adapt", "cluster", str(tasks), "--state", str(tmp_path / "buffer"), "--model", str(model_dir)]
    )
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "buffer" / "clusters" / "cluster-0001.jsonl").read_text() == "mine\n"


def test_bucket_by_tag_keeps_one_buffer_per_tag_and_the_default_one_for_all(tmp_path):
    lines = []
    for line in triggered_lines(90):
        record = json.loads(line)
        record["task"]["tag"] = "warm" if record["task"]["family"] in ("red", "green") else "cold"
        lines.append(json.dumps(record) + "\n")
    run_buffer(lines, tmp_path / "tagged", POLICY, TableEmbedder(), bucket_by_tag=True)
    state, _, _ = load_state(tmp_path / "tagged")
    assert set(state.buckets) == {"warm", "cold"}
    for cluster in state.clusters:
        assert {s.record["tag"] for s in cluster.members} == {cluster.bucket}
    assert {c.bucket for c in state.clusters} == {"warm", "cold"}
    run_buffer(lines, tmp_path / "single", POLICY, TableEmbedder())
    single, _, _ = load_state(tmp_path / "single")
    assert set(single.buckets) == {"all"} and {c.bucket for c in single.clusters} == {"all"}
