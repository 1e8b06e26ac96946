"""Measure ``s3lora scan`` on a store: adapters per second with 1 and 2 worker processes, on a local Ray instance,
and for a re-scan of the unchanged store from the cache; optionally the --similar pass.

The store is generated deterministically in a temporary directory: N PEFT adapters of a small Llama-style model
(``--blocks`` blocks, LoRA r = ``--r`` on q/k/v/o of width ``--hidden``; every fourth adapter has one sharp layer).
Each timing is wall-clock time of the whole scan (process or Ray start-up included), one run each; the machine's
other load disturbs it, so read the figures as rough.

    python scripts/bench_store.py [--n 1000] [--blocks 2] [--hidden 32] [--r 4] [--no-ray] [--similar]
    python scripts/bench_store.py --mixed --no-ray   # 8 layers of 64 x 64 to 576 x 576, r 4-16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3lora_cli import cores

cores.prepare_process()  # as the s3lora command does, before PyTorch starts its threads

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from s3lora_cli.gate import GatePolicy  # noqa: E402
from s3lora_cli.scoring import ScoreOptions  # noqa: E402
from s3lora_cli.spectral import Method  # noqa: E402
from s3lora_cli.store import ScanSettings, scan_store, with_neighbours  # noqa: E402

SIZES = (64, 128, 192, 256, 384, 576)
"""--mixed: adapter i has width SIZES[i % 6] and rank RANKS[i % 3] (8 layers of 64 x 64 to 576 x 576, r 4-16)."""
RANKS = (4, 8, 16)


def write_store(root: Path, n: int, blocks: int, hidden: int, r: int, mixed: bool = False) -> None:
    for i in range(n):
        if mixed:
            hidden, r = SIZES[i % len(SIZES)], RANKS[i % len(RANKS)]
        config = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 2 * r,
            "base_model_name_or_path": "bench/tiny-llama",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        }
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for block in range(blocks):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                stem = f"base_model.model.model.layers.{block}.self_attn.{proj}"
                a = torch.randn(r, hidden, generator=gen)
                b = torch.randn(hidden, r, generator=gen)
                if i % 4 == 0 and block == 0 and proj == "v_proj":
                    b[:, 0] *= 30.0
                tensors[f"{stem}.lora_A.weight"] = a
                tensors[f"{stem}.lora_B.weight"] = b
        path = root / f"tenant-{i:05d}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(config))


def timed_cli(label: str, n: int, store: Path, method: str, *extra: str) -> tuple[str, float, float]:
    """``s3lora scan`` as a user runs it: a new process, start-up (and its workers' start-up) included."""
    cmd = [sys.executable, "-m", "s3lora_cli", "scan", str(store), "--method", method, "--device", "cpu"]
    start = time.perf_counter()
    out = subprocess.run([*cmd, "--max-ssi", "0.9", "--format", "json", "--quiet", *extra], capture_output=True)
    seconds = time.perf_counter() - start
    rows = json.loads(out.stdout)["adapters"]
    assert out.returncode in (0, 1) and len(rows) == n and all(r["verdict"] != "error" for r in rows), label
    print(f"{label:<28} {seconds:8.2f} s  {n / seconds:8.1f} adapters/s", flush=True)
    return label, seconds, n / seconds


def timed(label: str, n: int, run) -> tuple[str, float, float]:
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    assert len(result.rows) == n and not any(r.error for r in result.rows), label
    print(f"{label:<28} {seconds:8.2f} s  {n / seconds:8.1f} adapters/s", flush=True)
    return label, seconds, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--method", default="mas-svd")
    parser.add_argument("--mixed", action="store_true", help="adapters of 64 x 64 to 576 x 576 layers, r 4-16 (SIZES)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    parser.add_argument("--similar", action="store_true", help="also time the pairwise --similar pass")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="s3lora-bench-store-"))
    try:
        store = tmp / "store"
        start = time.perf_counter()
        write_store(store, args.n, args.blocks, args.hidden, args.r, args.mixed)
        shape = (
            f"{SIZES[0]}x{SIZES[0]} to {SIZES[-1]}x{SIZES[-1]}, r {RANKS[0]}-{RANKS[-1]}"
            if args.mixed
            else f"{args.hidden}x{args.hidden}, r={args.r}"
        )
        print(
            f"store: {args.n} adapters x {4 * args.blocks} layers ({shape}), "
            f"written in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        settings = ScanSettings(ScoreOptions(method=Method(args.method), device="cpu"), GatePolicy(max_ssi=0.9))
        cache = tmp / "cache"
        # new processes, as users run them: in-process, a spawned worker would import this script (and PyTorch)
        timed_cli("1 worker, no cache", args.n, store, args.method, "--no-cache", "--workers", "1")
        timed_cli("2 workers, no cache", args.n, store, args.method, "--no-cache", "--workers", "2")
        if not args.no_ray:
            try:
                import ray
            except ImportError:
                print("ray: not installed (pip install 's3lora[ray]'); skipped", file=sys.stderr)
            else:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                try:
                    timed("ray (2 CPUs), no cache", args.n, lambda: scan_store(store, settings, ray_address="auto"))
                finally:
                    ray.shutdown()
        timed_cli("1 worker, filling the cache", args.n, store, args.method, "--cache-dir", str(cache))
        timed_cli("1 worker, cached re-scan", args.n, store, args.method, "--cache-dir", str(cache))
        if args.similar:
            scanned = scan_store(store, settings, cache)
            start = time.perf_counter()
            with_neighbours(scanned)
            print(f"{'--similar (all pairs)':<28} {time.perf_counter() - start:8.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
