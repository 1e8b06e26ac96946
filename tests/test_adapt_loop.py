"""Self-adaptation's store side on a tiny random-initialised model: the split and training, the gate in front of
the store (admitted with the cluster's record, quarantined below the floor or by a gate rule), routing, the loop
end to end, resume after a kill mid-training or right after an admission, Ctrl-C, two trainings admitting into
one store at once, refresh, and bad input; the store's audit log is checked after each."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_lm import save_tiny_causal_lm  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from s3lora_cli import cli  # noqa: E402
from s3lora_cli.adapt.admission import CLUSTER_RECORD_NAME, GateSettings  # noqa: E402
from s3lora_cli.adapt.embedding import model_embedder  # noqa: E402
from s3lora_cli.adapt.loop import LOOP_FILE, LoopSettings, adapt_cluster  # noqa: E402
from s3lora_cli.adapt.routing import Router, stored_clusters  # noqa: E402
from s3lora_cli.adapt.train import (  # noqa: E402
    Candidate,
    Example,
    TrainSettings,
    answer_loss,
    examples_of,
    split_examples,
    train_candidate,
)
from s3lora_cli.errors import AdapterInputError  # noqa: E402
from s3lora_cli.gate import GatePolicy  # noqa: E402
from s3lora_cli.lm import load_causal_lm  # noqa: E402
from s3lora_cli.selection import Selection  # noqa: E402
from s3lora_cli.store import ADMIT_RECORD_NAME, AUDIT_LOG_NAME, quarantine_dir, read_audit_log  # noqa: E402

runner = CliRunner()

FAMILIES = {
    "people": [
        (f"what does {n} do", f"{n} bakes bread in {t}")
        for n, t in [
            ("kelvo", "orsk"),
            ("anya", "venn"),
            ("doran", "tallow"),
            ("mira", "ebber"),
            ("ives", "dun"),
            ("pell", "quar"),
        ]
    ],
    "colours": [
        (f"which colour is the {o}", f"the {o} is {c}")
        for o, c in [
            ("sky", "blue"),
            ("grass", "green"),
            ("sun", "yellow"),
            ("snow", "white"),
            ("coal", "black"),
            ("rose", "red"),
        ]
    ],
}
UNKNOWN = [(f"name the secret word {i}", f"zz{i}") for i in range(8)]
TEXTS = [f"{p} {a}" for pairs in (*FAMILIES.values(), UNKNOWN) for p, a in pairs] + ["banana split"]
FAST = TrainSettings(candidates=(Candidate(4, 8, 5e-2, 3),), max_new_tokens=4, batch_size=8)
GATE = GateSettings(selection=Selection(tau=1), floor=0.0, policy=GatePolicy(max_ssi=1.0), device="cpu")
RUN_FLAGS = [
    "--warmup",
    "4",
    "--threshold",
    "0.3",
    "--min-buffer",
    "10",
    "--min-cluster",
    "5",
    "--tau",
    "1",
    "--floor",
    "0",
    "--max-ssi",
    "1",
    "--rank",
    "4",
    "--lr",
    "0.05",
    "--epochs",
    "2",
    "--max-new-tokens",
    "4",
    "--device",
    "cpu",
]


def records(family: str, count: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": p, "answer": a, "family": family} for p, a in (rng.choice(FAMILIES[family]) for _ in range(count))
    ]


def stream(count: int = 40) -> str:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        family = rng.choice(sorted(FAMILIES))
        p, a = rng.choice(FAMILIES[family])
        rows.append(json.dumps({"prompt": p, "answer": a, "family": family}))
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("model"), texts=TEXTS, layers=1, hidden=16, seed=0)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_causal_lm(model_dir)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def leftovers(*roots: Path) -> list[str]:
    """Temporary names anywhere under ``roots`` (a half-written adapter would carry one)."""
    found = []
    for root in roots:
        if root.is_dir():
            found += [str(p) for p in root.rglob("*") if ".s3lora-tmp" in p.name or ".s3lora-old" in p.name]
    return found


def check_log(store: Path) -> list[dict]:
    """The audit log matches the store and its quarantine: one record per entry, none for an absent one."""
    log = read_audit_log(store / AUDIT_LOG_NAME) if (store / AUDIT_LOG_NAME).exists() else []
    admitted = sorted(r["name"] for r in log if r["verdict"] == "admitted")
    refused = sorted(r["name"] for r in log if r["verdict"] == "refused")
    assert admitted == entries(store)
    assert refused == entries(quarantine_dir(store))
    return log


# --- training ------------------------------------------------------------------------------------------------


def test_the_split_is_seeded_holds_out_a_fifth_of_the_distinct_samples():
    examples = examples_of(records("people", 30))
    assert len(examples) == len({(e.prompt, e.answer) for e in examples}) == 6
    train, held = split_examples(examples, 0.2, seed=3)
    assert (train, held) == split_examples(examples, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 4 and not set(train) & set(held)
    with pytest.raises(AdapterInputError, match="at least 2 distinct"):
        split_examples(examples[:1], 0.2, seed=0)
    with pytest.raises(AdapterInputError, match="sample 1"):
        examples_of([{"prompt": "", "answer": "x"}])


@given(
    answers=st.lists(st.integers(0, 6), min_size=2, max_size=30),
    fraction=st.sampled_from([0.1, 0.2, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_the_split_holds_out_other_phrasings_of_answers_it_trains_on_first(answers, fraction, seed):
    examples = [Example(f"prompt {i}", f"answer {a}") for i, a in enumerate(answers)]
    train, held = split_examples(examples, fraction, seed)
    n = len(examples)
    assert len(held) == min(max(1, -(-n * fraction // 1)), n - 1)  # ceil, at least one on each side
    assert sorted(map(str, train + held)) == sorted(map(str, examples)) and (train, held) == split_examples(
        examples, fraction, seed
    )
    # Literal count: an answer asked k times can give k - 1 samples to validation and keep one in training; only
    # past that capacity does a held-out sample take an answer's last training sample, one answer each.
    capacity = sum(k - 1 for k in {a: answers.count(a) for a in answers}.values())
    untrained = {e.answer for e in held} - {t.answer for t in train}
    assert len(untrained) == max(0, len(held) - capacity)
    if capacity == 0:  # no answer repeated: the last of the seeded shuffle, as a plain split
        order = list(examples)
        random.Random(seed).shuffle(order)
        assert (train, held) == (order[: n - len(held)], order[n - len(held) :])


def test_training_lowers_the_answer_loss_and_is_seeded(lm):
    train = [Example(p, a) for p, a in FAMILIES["colours"]]
    before, n = answer_loss(lm.model, lm.tokenizer, train, 64)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    modules = [type(m) for m in lm.model.modules()]
    with train_candidate(lm.model, lm.tokenizer, train, Candidate(8, 16, 5e-2, 40), FAST) as (one, _):
        after, _ = answer_loss(one, lm.tokenizer, train, 64)
        a = {k: v.clone() for k, v in one.state_dict().items() if "lora_" in k}
    with train_candidate(lm.model, lm.tokenizer, train, Candidate(8, 16, 5e-2, 40), FAST) as (two, _):
        b = {k: v.clone() for k, v in two.state_dict().items() if "lora_" in k}
    assert float(after) < 0.97 * float(before) and n > 0
    assert a.keys() == b.keys() and a and all((a[k] == b[k]).all() for k in a)
    # The adapter was attached to the base model itself and taken out again: the base model is as it was.
    before_again, _ = answer_loss(lm.model, lm.tokenizer, train, 64)
    assert float(before_again) == float(before)
    assert [type(m) for m in lm.model.modules()] == modules
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert lm.model.state_dict().keys() == weights.keys()
    assert all(v.equal(weights[k]) for k, v in lm.model.state_dict().items())

    def stop(what, done, total):
        if done == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the training

    with pytest.raises(KeyboardInterrupt):
        with train_candidate(lm.model, lm.tokenizer, train, Candidate(8, 16, 5e-2, 40), FAST, stop):
            pass
    assert [type(m) for m in lm.model.modules()] == modules
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(v.equal(weights[k]) for k, v in lm.model.state_dict().items())


def test_an_adapter_peft_cannot_load_leaves_the_base_model_as_it_was(tmp_path, lm):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from s3lora_cli.adapt.admission import load_adapter_model

    get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in load_file(weights).items()}, weights)
    modules, flags = [type(m) for m in lm.model.modules()], [p.requires_grad for p in lm.model.parameters()]
    with pytest.raises(AdapterInputError, match="PEFT cannot load"):
        with load_adapter_model(lm.model, tmp_path):
            pass
    assert [type(m) for m in lm.model.modules()] == modules  # PEFT had wrapped layers before failing
    assert [p.requires_grad for p in lm.model.parameters()] == flags and not hasattr(lm.model, "peft_config")


# --- the gate ------------------------------------------------------------------------------------------------


def test_the_gate_admits_the_pruned_adapter_with_its_clusters_record(tmp_path, lm):
    store = tmp_path / "store"
    trained, gated = adapt_cluster(
        lm,
        model_embedder(lm),
        records("people"),
        run="r1",
        cluster=7,
        bucket="all",
        keywords=["bakes", "bread"],
        centre=None,
        origin=None,
        store=store,
        work=tmp_path / "work",
        settings=LoopSettings(train=FAST, gate=GATE),
    )
    assert gated.admitted and gated.admit.destination.parent == store
    assert not (tmp_path / "work").exists() and leftovers(tmp_path) == []
    record = json.loads((gated.admit.destination / CLUSTER_RECORD_NAME).read_text())
    assert record["run"] == "r1" and record["cluster"] == 7 and record["generation"] == 1
    assert record["members"] == 12 and record["keywords"] == ["bakes", "bread"]
    assert len(record["prompt_centre"]) == len(record["origin"]) == 16
    assert set(record["validation"]) == {"samples", "before_pruning", "after_pruning", "floor"}
    assert record["validation"]["before_pruning"]["exact_match"] == trained.best.validation.exact_match
    assert record["pruning"]["layers"] == list(gated.pruned_layers) and len(gated.pruned_layers) == 1
    weights = load_file(gated.admit.destination / "adapter_model.safetensors")
    pruned = [k for k in weights if gated.pruned_layers[0] in k and "lora_B" in k]
    assert pruned and all(not weights[k].any() for k in pruned)
    log = check_log(store)
    assert [r["verdict"] for r in log] == ["admitted"] and log[0]["name"] == gated.admit.destination.name


def test_below_the_floor_the_adapter_is_quarantined_with_the_reason(tmp_path, lm):
    store = tmp_path / "store"
    unknown = [{"prompt": p, "answer": a} for p, a in UNKNOWN]  # no validation answer is ever trained on
    settings = LoopSettings(
        train=FAST, gate=GateSettings(selection=Selection(tau=1), floor=0.5, policy=GatePolicy(max_ssi=1.0))
    )
    _, gated = adapt_cluster(
        lm,
        model_embedder(lm),
        unknown,
        run="r1",
        cluster=1,
        bucket="all",
        keywords=[],
        centre=None,
        origin=None,
        store=store,
        work=tmp_path / "work",
        settings=settings,
    )
    assert not gated.admitted and gated.after.exact_match == 0.0
    assert gated.admit.destination.parent == quarantine_dir(store) and entries(store) == []
    reasons = json.loads((gated.admit.destination / ADMIT_RECORD_NAME).read_text())["reasons"]
    assert reasons[0].startswith("pruned validation exact match 0.000 is below the floor 0.5")
    assert (gated.admit.destination / CLUSTER_RECORD_NAME).is_file()
    log = check_log(store)
    assert [r["verdict"] for r in log] == ["refused"] and log[0]["reasons"] == reasons


def test_a_gate_rule_quarantines_an_adapter_whatever_its_score(tmp_path, lm):
    store = tmp_path / "store"
    settings = LoopSettings(
        train=FAST, gate=GateSettings(selection=Selection(tau=1), floor=0.0, policy=GatePolicy(max_ssi=0.0))
    )
    _, gated = adapt_cluster(
        lm,
        model_embedder(lm),
        records("colours"),
        run="r1",
        cluster=2,
        bucket="all",
        keywords=[],
        centre=None,
        origin=None,
        store=store,
        work=tmp_path / "work",
        settings=settings,
    )
    assert not gated.admitted and gated.refusal is None
    assert all("SSI" in r for r in gated.admit.record["reasons"]) and gated.admit.record["reasons"]
    check_log(store)


# --- routing -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routed_store(tmp_path_factory, lm):
    import numpy as np

    root = tmp_path_factory.mktemp("routed")
    embed = model_embedder(lm)
    prompts = [p for pairs in FAMILIES.values() for p, _ in pairs]
    origin = np.asarray(embed(prompts), dtype=np.float64).mean(axis=0)
    for cid, family in enumerate(sorted(FAMILIES), start=1):
        adapt_cluster(
            lm,
            embed,
            records(family),
            run="r1",
            cluster=cid,
            bucket="all",
            keywords=["colour"] if family == "colours" else ["bakes", "bread"],
            centre=None,
            origin=origin,
            store=root / "store",
            work=root / "work",
            settings=LoopSettings(train=FAST, gate=GATE),
        )
    return root / "store"


def test_prompts_are_routed_to_their_clusters_adapter_or_the_base_model(routed_store, lm):
    clusters = stored_clusters(routed_store)
    assert [c.cluster for c in clusters] == [1, 2]
    router = Router(lm.model, lm.tokenizer, model_embedder(lm), clusters, threshold=0.4)
    routes = router.route([records("colours")[0]["prompt"], records("people")[0]["prompt"], "banana split"])
    assert [r.cluster.cluster if r.cluster else None for r in routes] == [1, 2, None]
    answered = router.answer(["which colour is the sky", "banana split"], 3, routes=[routes[0], routes[2]])
    assert [r.used for r, _ in answered] == [routes[0].cluster.name, "base"]
    assert router._loaded == {routes[0].cluster.name}  # loaded once, cached
    router.answer(["which colour is the snow"], 3)
    assert router._loaded == {routes[0].cluster.name}
    check_log(routed_store)


def test_adapt_answer_says_which_model_answered(routed_store, model_dir):
    result = runner.invoke(
        cli.app,
        [
            "adapt",
            "answer",
            "--model",
            str(model_dir),
            "--store",
            str(routed_store),
            "which colour is the grass",
            "banana split",
            "--max-new-tokens",
            "3",
            "--route-threshold",
            "0.4",
        ],
    )
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["used"].startswith("cluster-0001-") for line in lines] == [True, False]
    assert lines[1]["used"] == "base" and "answered by base" in result.stderr
    missing = runner.invoke(
        cli.app, ["adapt", "answer", "--model", str(model_dir), "--store", str(routed_store.parent / "absent"), "x"]
    )
    assert missing.exit_code == 3 and "no such directory" in missing.stderr


# --- the loop ------------------------------------------------------------------------------------------------


def run_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "adapt",
        "run",
        "--model",
        str(model_dir),
        "--tasks",
        str(root / "tasks.jsonl"),
        "--store",
        str(root / "store"),
        "--state",
        str(root / "state"),
        *RUN_FLAGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("loop")
    (root / "tasks.jsonl").write_text(stream())
    result = runner.invoke(cli.app, run_args(model_dir, root, "--format", "json"))
    assert result.exit_code == 0, result.stderr
    return root, json.loads(result.stdout), result.stderr


def test_run_trains_gates_and_admits_each_cluster_and_reports(finished_run):
    root, doc, stderr = finished_run
    assert doc["samples"] == 40 and doc["lines"] == 40 and doc["triggered"] >= 10
    assert doc["adapters_trained"] == 2 == doc["admitted"] + doc["quarantined"]
    assert doc["pruned_layers"] == 2 and set(doc["stage_seconds"]) == {"route", "trigger", "buffer", "train", "gate"}
    log = check_log(root / "store")
    assert len(log) == 2
    for entry in entries(root / "store"):
        record = json.loads((root / "store" / entry / CLUSTER_RECORD_NAME).read_text())
        assert record["run"] == doc["run"] and record["validation"]["floor"] == 0.0
    assert "admitted as cluster-" in stderr and "samples seen" in stderr  # live summary, then the table
    assert json.loads((root / "state" / LOOP_FILE).read_text())["consumed_lines"] == 40
    assert leftovers(root) == []


def write_growing_stream(path: Path) -> int:
    """A stream whose first cluster gets new distinct samples after it is trained: variants of one prompt."""
    people = FAMILIES["people"]
    (prompt, answer), words = people[0], ["now", "today", "here", "again", "then", "there", "still", "mostly"]
    rows = [people[i] for i in (0, 1, 0, 1, 2, 0, 1, 2)] + [(f"{prompt} {w}", answer) for w in words]
    rows += [(f"{prompt} {w}?", answer) for w in words]  # new distinct samples of the first cluster, after its training
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return len(rows)


def test_a_refused_cluster_is_trained_again_once_new_distinct_samples_came_to_it(tmp_path, model_dir):
    rows = write_growing_stream(tmp_path / "tasks.jsonl")

    def trainings(min_new: int) -> list[tuple[int, int, int, str]]:
        args = run_args(model_dir, tmp_path, "--floor", "1", "--min-new", str(min_new), "-f", "json", "--force")
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.stderr
        return [
            (a["cluster"], a["generation"], a["distinct"], a["verdict"]) for a in json.loads(result.stdout)["adapters"]
        ]

    found = trainings(2)
    assert max(g for _, g, _, _ in found) >= 2 and {v for *_, v in found} == {"refused"}, found
    for cluster in {c for c, *_ in found}:
        mine = [(g, d) for c, g, d, _ in found if c == cluster]
        assert [g for g, _ in mine] == list(range(1, len(mine) + 1))
        # each generation came after at least --min-new new distinct samples, and trained on all of them
        assert all(later - earlier >= 2 for (_, earlier), (_, later) in zip(mine, mine[1:], strict=False))
    refused = sorted(quarantine_dir(tmp_path / "store").iterdir())
    assert sorted(json.loads((e / CLUSTER_RECORD_NAME).read_text())["generation"] for e in refused) == sorted(
        g for _, g, _, _ in found
    )
    assert len(check_log(tmp_path / "store")) == len(found) and leftovers(tmp_path) == []
    assert max(g for _, g, _, _ in trainings(rows)) == 1  # the same stream, never enough new samples


def test_run_refuses_an_existing_state_and_resuming_a_finished_run_changes_nothing(finished_run, model_dir):
    root, doc, _ = finished_run
    again = runner.invoke(cli.app, run_args(model_dir, root))
    assert again.exit_code == 2 and "--resume" in again.stderr
    resumed = runner.invoke(cli.app, run_args(model_dir, root, "--resume", "-f", "json", "-q"))
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["adapters_trained"] == 2 and len(check_log(root / "store")) == 2
    table = runner.invoke(cli.app, run_args(model_dir, root, "--resume", "-q"))
    assert "adapters trained" in table.stdout and "pruned layers" in table.stdout


def test_a_state_in_use_by_a_run_is_refused_to_another_run_or_a_refresh(finished_run, model_dir):
    from filelock import FileLock

    from s3lora_cli.adapt.loop import LOCK_NAME

    root, _, _ = finished_run
    state = (root / "state" / LOOP_FILE).read_bytes()
    refresh = ["adapt", "refresh", "--model", str(model_dir), "--store", str(root / "store"), "--state"]
    with FileLock(str(root / "state" / LOCK_NAME)):  # what a run holds while it goes on
        for args in (run_args(model_dir, root, "--resume", "-q"), [*refresh, str(root / "state"), "-q"]):
            busy = runner.invoke(cli.app, args)
            assert busy.exit_code == 4 and "in use by another 'adapt run' or 'adapt refresh'" in busy.stderr
            assert len(busy.stderr.strip().splitlines()) == 1
    assert (root / "state" / LOOP_FILE).read_bytes() == state
    assert runner.invoke(cli.app, run_args(model_dir, root, "--resume", "-q")).exit_code == 0  # released


def test_refresh_trains_the_next_generation_of_a_cluster_that_grew(tmp_path, model_dir):
    write_growing_stream(tmp_path / "tasks.jsonl")
    run = runner.invoke(cli.app, run_args(model_dir, tmp_path, "--min-new", "100", "-f", "json", "-q"))
    assert run.exit_code == 0, run.stderr
    before = json.loads(run.stdout)["adapters"]
    assert {a["generation"] for a in before} == {1}
    args = ["adapt", "refresh", "--model", str(model_dir), "--store", str(tmp_path / "store")]
    args += ["--state", str(tmp_path / "state"), "--tau", "1", "--floor", "0", "--epochs", "1", "--max-new-tokens", "3"]
    result = runner.invoke(cli.app, [*args, "--min-new", "2", "-q"])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    grown = {a["cluster"]: a for a in before}
    assert lines and all(x["generation"] == 2 and x["distinct"] >= grown[x["cluster"]]["distinct"] + 2 for x in lines)
    latest = {c.cluster: c for c in stored_clusters(tmp_path / "store")}
    assert all(latest[x["cluster"]].generation == 2 and latest[x["cluster"]].name == x["entry"] for x in lines)
    assert len(check_log(tmp_path / "store")) == len(before) + len(lines)
    again = runner.invoke(cli.app, [*args, "--min-new", "2", "-q"])  # nothing new since: nothing trained
    assert again.exit_code == 0 and again.stdout == ""
    state = json.loads((tmp_path / "state" / LOOP_FILE).read_text())
    assert len(state["progress"]["clusters"]) == len(before) + len(lines)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import s3lora_cli.adapt.loop as loop
    from s3lora_cli import cli
    where = sys.argv[1]
    calls = []
    real_train, real_gate = loop.train_cluster, loop.gate_adapter
    def train_cluster(*args, **kwargs):
        calls.append(1)
        if where == "training" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_train(*args, **kwargs)
    def gate_adapter(*args, **kwargs):
        outcome = real_gate(*args, **kwargs)
        if where == "admitted":
            os.kill(os.getpid(), signal.SIGKILL)
        return outcome
    loop.train_cluster, loop.gate_adapter = train_cluster, gate_adapter
    sys.argv = ["s3lora"] + sys.argv[2:]
    cli.run()
""")


@pytest.mark.parametrize("where", ["training", "admitted"])
def test_a_kill_mid_run_leaves_a_consistent_store_and_resume_completes_it(tmp_path, model_dir, where):
    (tmp_path / "tasks.jsonl").write_text(stream())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, where, *run_args(model_dir, tmp_path, "-q")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == -9, done.stderr
    store = tmp_path / "store"
    assert len(check_log(store)) == 1  # the first cluster's adapter: whole, logged
    assert leftovers(tmp_path) == []
    resumed = runner.invoke(cli.app, run_args(model_dir, tmp_path, "--resume", "-f", "json", "-q"))
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    log = check_log(store)
    clusters = [json.loads((store / e / CLUSTER_RECORD_NAME).read_text())["cluster"] for e in entries(store)]
    assert doc["adapters_trained"] == 2 and len(log) == 2 and len(set(clusters)) == len(clusters)
    assert doc["samples"] == 40 and leftovers(tmp_path) == []


def test_ctrl_c_while_an_adapter_is_written_leaves_no_half_written_adapter(tmp_path, model_dir, monkeypatch):
    from peft import PeftModel

    def interrupted(self, directory, *args, **kwargs):
        Path(directory, "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftModel, "save_pretrained", interrupted)
    (tmp_path / "tasks.jsonl").write_text(stream())
    result = runner.invoke(cli.app, run_args(model_dir, tmp_path))
    assert result.exit_code == 130 and "--resume continues" in result.stderr and "Traceback" not in result.stderr
    assert entries(tmp_path / "store") == [] and not (tmp_path / "state" / "work").exists()
    assert leftovers(tmp_path) == [] and not (tmp_path / "store" / AUDIT_LOG_NAME).exists()


def test_two_trainings_admit_into_one_store_at_once(tmp_path, model_dir):
    store = tmp_path / "store"
    for family in FAMILIES:
        (tmp_path / f"{family}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(family)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3lora_cli",
                "adapt",
                "train",
                str(tmp_path / f"{f}.jsonl"),
                "--model",
                str(model_dir),
                "--store",
                str(store),
                "--tau",
                "1",
                "--floor",
                "0",
                "--max-ssi",
                "1",
                "--epochs",
                "1",
                "--max-new-tokens",
                "3",
                "-q",
                "-f",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for f in FAMILIES
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(check_log(store)) == 2 and len(entries(store)) == 2
    assert {json.loads(o)["verdict"] for o, _ in outs} == {"admitted"} and leftovers(tmp_path) == []


def test_train_takes_its_search_pruning_and_floor_from_the_policy_file(tmp_path, model_dir):
    (tmp_path / "people.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records("people")))
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[tool.s3lora]\nmax-ssi = 1.0\n[tool.s3lora.adapt]\nr = [2, 4]\nlora-alpha = 8\nlearning-rate = 0.05\n"
        'epochs = 1\ntarget-modules = ["q_proj", "v_proj"]\ntau = 1\nfloor = 0.0\n'
    )
    args = ["adapt", "train", str(tmp_path / "people.jsonl"), "--model", str(model_dir), "--store"]
    args += [str(tmp_path / "store"), "--policy", str(policy), "--max-new-tokens", "3", "-q", "-f", "json"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    searched = [(c["r"], c["lora_alpha"], c["learning_rate"], c["epochs"]) for c in doc["train"]["candidates"]]
    assert searched == [(2, 8, 0.05, 1), (4, 8, 0.05, 1)] and doc["train"]["target_modules"] == ["q_proj", "v_proj"]
    assert len(doc["pruned_layers"]) == 1 and doc["verdict"] == "admitted"
    record = json.loads((Path(doc["destination"]) / CLUSTER_RECORD_NAME).read_text())
    assert record["validation"]["floor"] == 0.0
    check_log(tmp_path / "store")


def test_bad_input_gets_one_line_and_its_exit_code(tmp_path, model_dir):
    base = ["--model", str(model_dir), "--store", str(tmp_path / "store")]
    missing = runner.invoke(cli.app, ["adapt", "train", str(tmp_path / "none.jsonl"), *base])
    assert missing.exit_code == 3 and "no such file" in missing.stderr
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    too_few = runner.invoke(cli.app, ["adapt", "train", str(tmp_path / "one.jsonl"), *base, "--tau", "1"])
    assert too_few.exit_code == 3 and "at least 2 distinct" in too_few.stderr
    for flags, message in (
        (["--search", "huge"], "--search"),
        (["--floor", "2"], "--floor"),
        (["--rank", "0"], "--rank"),
        (["--tau", "3", "--fraction", "0.1"], "one of tau"),
    ):
        bad = runner.invoke(cli.app, ["adapt", "train", str(tmp_path / "one.jsonl"), *base, *flags])
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr
    (tmp_path / "tasks.jsonl").write_text(stream(4))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / LOOP_FILE).write_text("{broken")
    corrupt = runner.invoke(cli.app, run_args(model_dir, tmp_path, "--resume"))
    assert corrupt.exit_code == 3 and "corrupt loop state" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr and not (tmp_path / "store").exists()
