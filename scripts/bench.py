"""Benchmark s3lora score on generated Llama-shaped adapters; prints times, memory and ratios side by side.

    python scripts/bench.py                       # demo, 7B-qkvo (and its ratios)
    python scripts/bench.py --cases 7B-qkvo 7B-all 70B-all --device cpu
    python scripts/bench.py --cases 7B-qkvo --device cuda
    python scripts/bench.py --cases store --store-size 1000   # s3lora scan: adapters per second
    python scripts/bench.py --cases 70B-all --blocks 4 --skip-ratios   # a prefix of the blocks, extrapolated
    python scripts/bench.py --cases 135M-all                  # a small model's adapter (210 small layers)

    python scripts/bench.py --cases 7B-qkvo 7B-qkvo-isotropic 7B-qkvo-mixed --floor   # against the floor
    python scripts/bench.py --cases 135M-all --concurrent 2   # two processes at once against one alone
    python scripts/bench.py --layer-times 64x64 256x256 --threads 1   # mas_svd per layer, in-process
    python scripts/bench.py --cases 7B-qkvo --blocks 2 --jobs 1 2   # layers in parallel: --jobs 1 against 2

Adapters are generated deterministically into a temporary directory (nothing large is committed), written
one tensor at a time, so that even the 1.7 GB 70B adapter never sits in memory. Their updates have one of
three spectra (the case's name says which; real adapters have all kinds):
- decaying (the default): lora_B's r columns scaled by 1/(1+i), every eighth layer sharp (one direction 20x
  stronger), as trained adapters often are;
- isotropic: plain Gaussian factors, an update whose r singular values are all close (a freshly initialised or
  lightly trained adapter): every step of the greedy fit is a near tie;
- mixed: decaying, isotropic and sharp layers in turn.
The shapes: Llama-7B (4096 x 4096 q, k, v, o; all seven projections), Llama-70B, SmolLM2-135M (all seven
projections, 576 / 192 / 1536), T5-large (1024 x 1024 q and v, r = 16), and small layers (64 x 64 to 256 x 256).

Per case: the wall time of the whole `s3lora score` process (start-up included), the time per layer, the
peak resident memory of that process; with --floor, the floor measured in the same run (per layer, M passes
of the cheapest exact kernel over all d x k residual entries: one read of every entry per greedy step, nothing
else) and score / floor; with --concurrent N, N processes at once against one alone; and, measured in the same
run on a sample of layers:
- default (screened) against --exhaustive, with the picks compared;
- default against the dense float64 reference of the tests, on layers it can finish;
- --method svd against --method mas-svd (whole adapter);
- start-up, once: `score --demo` (PyTorch, numba and the kernels loaded; 16 small layers) and the same with
  `--method svd` (NumPy only), the fastest of 3 runs each; a case's fit per layer is its time less the first.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3lora_cli import cores

cores.prepare_process()  # as the s3lora command does: the floor is measured under the same thread rules

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QKVO_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
ALL_135M = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
CASES = {
    # name: (blocks, {proj: (out, in)}, r); the spectrum is in the name (see spectrum_of)
    "7B-qkvo": (32, QKVO_7B, 8),
    "7B-qkvo-isotropic": (32, QKVO_7B, 8),
    "7B-qkvo-mixed": (32, QKVO_7B, 8),
    "7B-all": (
        32,
        {
            "q_proj": (4096, 4096),
            "k_proj": (4096, 4096),
            "v_proj": (4096, 4096),
            "o_proj": (4096, 4096),
            "gate_proj": (11008, 4096),
            "up_proj": (11008, 4096),
            "down_proj": (4096, 11008),
        },
        16,
    ),
    "70B-all": (
        80,
        {
            "q_proj": (8192, 8192),
            "k_proj": (1024, 8192),
            "v_proj": (1024, 8192),
            "o_proj": (8192, 8192),
            "gate_proj": (28672, 8192),
            "up_proj": (28672, 8192),
            "down_proj": (8192, 28672),
        },
        16,
    ),
    # a small model's adapter: SmolLM2-135M shapes (hidden 576, kv 192, MLP 1536), all seven projections
    "135M-all": (30, ALL_135M, 8),
    "135M-all-mixed": (30, ALL_135M, 8),
    "135M-all-isotropic": (30, ALL_135M, 8),
    # T5-large r=16 on q and v (144 layers of 1024 x 1024, as the encoder's and decoder's attention have them)
    "t5-large-mixed": (72, {"q": (1024, 1024), "v": (1024, 1024)}, 16),
    "t5-large-isotropic": (72, {"q": (1024, 1024), "v": (1024, 1024)}, 16),
    # layers under 256 x 256 (the 2 ms per layer target): 64 x 64 to 256 x 256, r = 8
    "small-mixed": (16, {"q_proj": (64, 64), "k_proj": (128, 128), "v_proj": (256, 128), "o_proj": (256, 256)}, 8),
}
MLP = {"gate_proj", "up_proj", "down_proj"}
THREAD_ENV = dict(os.environ)
"""The environment of the `s3lora score` processes (``--threads`` sets the thread counts here)."""


def spectrum_of(case: str) -> str:
    return "isotropic" if case.endswith("-isotropic") else "mixed" if case.endswith("-mixed") else "decaying"


def layer_factors(
    index: int, out: int, inp: int, r: int, spectrum: str = "decaying"
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + index)
    a = torch.randn(r, inp, generator=gen) / inp**0.5
    b = torch.randn(out, r, generator=gen) * 1e-2
    kind = spectrum if spectrum != "mixed" else ("decaying", "isotropic", "sharp")[index % 3]
    if kind != "isotropic":
        b /= torch.arange(1, r + 1, dtype=torch.float32)
    if kind == "sharp" or (kind == "decaying" and spectrum == "decaying" and index % 8 == 0):
        b[:, 0] *= 20.0
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


def write_adapter(path: Path, case: str, blocks: int | None = None) -> Path:
    """A PEFT adapter directory, its safetensors file written tensor by tensor (the first ``blocks`` blocks of
    the case, or all)."""
    all_blocks, projs, r = CASES[case]
    blocks = min(blocks or all_blocks, all_blocks)
    path.mkdir(parents=True, exist_ok=True)
    entries, offset = [], 0
    for block in range(blocks):
        for proj, (out, inp) in projs.items():
            part = "mlp" if proj in MLP else "self_attn"
            stem = f"base_model.model.model.layers.{block}.{part}.{proj}"
            for name, shape in (("lora_A", [r, inp]), ("lora_B", [out, r])):
                size = shape[0] * shape[1] * 2
                entries.append((f"{stem}.{name}.weight", shape, offset, offset + size))
                offset += size
    header = {"__metadata__": {"format": "pt"}}
    header.update({key: {"dtype": "BF16", "shape": shape, "data_offsets": [lo, hi]} for key, shape, lo, hi in entries})
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path / "adapter_model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        index = 0
        for _ in range(blocks):
            for out, inp in projs.values():
                a, b = layer_factors(index, out, inp, r, spectrum_of(case))
                index += 1
                fh.write(a.contiguous().view(torch.int16).numpy().tobytes())
                fh.write(b.contiguous().view(torch.int16).numpy().tobytes())
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted(projs),
        "base_model_name_or_path": f"bench/{case}",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


SCORE_WITH_PEAK = """
import atexit, sys

def peak() -> None:  # VmHWM: this process's own peak (ru_maxrss keeps the bench's, inherited at fork)
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\npeak-rss-kib {kib}\\n")

atexit.register(peak)
sys.argv[0] = "s3lora"
from s3lora_cli.cli import run
run()
"""
"""``s3lora`` that writes its own peak resident memory to stderr on exit (Linux)."""


def run_score(adapter: Path, *extra: str) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MiB) and the JSON report of one `s3lora score` process."""
    args = ["score", str(adapter), "--format", "json", "--quiet", *extra]
    cmd = [sys.executable, "-c", SCORE_WITH_PEAK, *args]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=THREAD_ENV)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"s3lora {' '.join(args)} failed:\n{out.stderr}")
    peak = int(out.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0])
    return wall, peak / 1024, json.loads(out.stdout)


def sample_ratios(adapter: Path, layers: int, crop: int, device: str) -> dict:
    """On a sample of layers: default vs exhaustive vs the dense float64 reference, timed in-process."""
    from reference import reference

    from s3lora_cli import open_adapter
    from s3lora_cli.scoring import ScoreOptions, resolve_device, score_layer

    dev = str(resolve_device(device))
    timings = {"default": 0.0, "exhaustive": 0.0, "reference": 0.0, "default_on_reference_layers": 0.0}
    same_picks, compared, ref_layers, ssi_err, same_picks_ref = 0, 0, 0, 0.0, 0
    with open_adapter(adapter) as opened:
        n = len(opened.layers)  # spread over the adapter, first and last included
        chosen = [opened.layers[round(i * (n - 1) / max(layers - 1, 1))] for i in range(min(layers, n))]
        # untimed: the first fit of a process loads (or compiles) the kernels, which would be charged to one mode
        left, right = opened.load_factors(chosen[0], "float32")
        for exhaustive in (False, True):
            score_layer(left[:crop], right[:, :crop], chosen[0], ScoreOptions(exhaustive=exhaustive), dev)
        for layer in chosen:
            left, right = opened.load_factors(layer, "float32")
            start = time.perf_counter()
            fast = score_layer(left, right, layer, ScoreOptions(), dev)
            t_fast = time.perf_counter() - start
            timings["default"] += t_fast
            start = time.perf_counter()
            full = score_layer(left, right, layer, ScoreOptions(exhaustive=True), dev)
            timings["exhaustive"] += time.perf_counter() - start
            compared += 1
            same_picks += [(p.a, p.b) for p in fast.picks] == [(p.a, p.b) for p in full.picks]
            # The dense reference cannot finish a 4096 x 4096 layer: it runs on the layer's top-left block
            # (rows and columns cropped to at most `crop`), and so does the default path it is compared with.
            rows, cols = min(layer.shape[0], crop), min(layer.shape[1], crop)
            sub_left, sub_right = left[:rows], right[:, :cols]
            start = time.perf_counter()
            sub = score_layer(sub_left, sub_right, layer, ScoreOptions(), dev)
            timings["default_on_reference_layers"] += time.perf_counter() - start
            dw = sub_left.astype(np.float64) @ sub_right.astype(np.float64)
            start = time.perf_counter()
            ref = reference(dw, rank=layer.r)
            timings["reference"] += time.perf_counter() - start
            ref_layers += 1
            same_picks_ref += [(p.a, p.b) for p in sub.picks] == [p[:2] for p in ref.picks]
            ssi_err = max(ssi_err, abs(ref.ssi - sub.ssi) / max(abs(ref.ssi), 1e-300))
    return {
        "layers": compared,
        "same_picks": same_picks,
        "reference_layers": ref_layers,
        "max_rel_ssi_error_vs_reference": ssi_err,
        "same_picks_reference": same_picks_ref,
        **timings,
    }


def floor_seconds(adapter: Path, repeats: int = 2) -> float:
    """The floor of a case, in-process: per layer, M = min(8, r) passes of the exact kernel (one pair, a bracket
    that keeps no ratio) over all d x k entries of its residual, formed once per shape beforehand (at most
    CACHE_ENTRIES of them; larger layers read the formed chunks again). The best of ``repeats``."""
    import numpy as np

    from s3lora_cli import open_adapter
    from s3lora_cli.engine import kernels, residual

    if not kernels.available:
        raise SystemExit("--floor needs numba")
    cores.set_threads(cores.share(1))  # the threads a score process starts with
    with open_adapter(adapter) as opened:
        shapes = [(layer.shape[0], layer.shape[1], layer.r) for layer in opened.layers]
    per_shape = {}
    for d, k, r in sorted(set(shapes)):
        gen = torch.Generator().manual_seed(d * 7 + k)
        left, right = torch.randn(d, r, generator=gen), torch.randn(r, k, generator=gen)
        rows_list = list(residual.row_chunks(d, k))
        room, formed = residual.CACHE_ENTRIES, []
        for rows in rows_list:
            if room >= (rows.stop - rows.start) * k:
                formed.append((left[rows] @ right).numpy())
                room -= formed[-1].size
        u, v = torch.randn(d, generator=gen).numpy(), torch.randn(k, generator=gen).numpy()
        scratch: dict = {}
        kernels.bracket_pass(formed[0], u[rows_list[0]], v, np.inf, np.inf, scratch)  # compiled and warm
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(min(8, r)):
                for index, rows in enumerate(rows_list):
                    chunk = formed[index % len(formed)]
                    kernels.bracket_pass(chunk[: rows.stop - rows.start], u[rows], v, np.inf, np.inf, scratch)
            best = min(best, time.perf_counter() - start)
        per_shape[d, k, r] = best
    return sum(per_shape[shape] for shape in shapes)


def layer_times(shapes: list[str], ranks: list[int], repeats: int) -> None:
    """Print the in-process time of ``mas_svd`` on one generated layer of each shape and rank (decaying and isotropic
    spectra, bf16 factors scored in float32 as ``score`` does): the median and the best of ``repeats`` calls, after
    one untimed call (which loads the compiled kernels). No start-up, no reading: the fit and the small-factor work."""
    from s3lora_cli.engine import mas_svd

    for shape in shapes:
        out, inp = (int(x) for x in shape.lower().split("x"))
        for r in ranks:
            line = []
            for spectrum in ("decaying", "isotropic"):
                a, b = layer_factors(out + inp + r, out, inp, r, spectrum)
                left, right = b.float(), a.float()
                mas_svd(left, right)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    mas_svd(left, right)
                    times.append(time.perf_counter() - start)
                times.sort()
                line.append(f"{spectrum} {times[len(times) // 2] * 1e3:.1f} ms (best {times[0] * 1e3:.1f})")
            print(f"[layer {out}x{inp} r={r}] " + ", ".join(line), flush=True)


def concurrent_walls(adapter: Path, n: int, *extra: str) -> list[float]:
    """Wall seconds of each of n `s3lora score` processes started together."""
    cmd = [sys.executable, "-m", "s3lora_cli", "score", str(adapter), "--format", "json", "--quiet", *extra]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=THREAD_ENV) for _ in range(n)]
    walls = []
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
        walls.append(time.perf_counter() - start)
    return walls


def jobs_walls(adapter: Path, counts: tuple[int, ...], *extra: str) -> dict[int, float]:
    """Wall seconds of `s3lora score --jobs N` for each N, one after the other."""
    return {n: run_score(adapter, "--jobs", str(n), *extra)[0] for n in counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["demo", "7B-qkvo"], choices=["demo", *CASES, "store"])
    parser.add_argument("--store-size", type=int, default=1000, help="adapters in the store case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample-layers", type=int, default=4, help="layers for the exhaustive/reference ratios")
    parser.add_argument(
        "--crop", type=int, default=256, help="rows and columns of each sampled layer that the dense reference runs on"
    )
    parser.add_argument("--skip-ratios", action="store_true")
    parser.add_argument("--floor", action="store_true", help="measure each case's floor and print score / floor")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=0,
        metavar="N",
        help="also run N score processes at once and compare each with one alone",
    )
    parser.add_argument(
        "--jobs", type=int, nargs="*", metavar="N", help="also time `score --jobs N` for each N (e.g. --jobs 1 2)"
    )
    parser.add_argument(
        "--blocks",
        type=int,
        help="generate only the first N transformer blocks of each case and extrapolate the time to all of them",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for torch, BLAS and the compiled kernels (default: what they choose, one per core)",
    )
    parser.add_argument(
        "--layer-times",
        nargs="+",
        metavar="DxK",
        help="instead of the cases: time mas_svd in-process on one layer of each shape (e.g. 64x64 1024x1024)",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="ranks for --layer-times")
    parser.add_argument("--repeats", type=int, default=7, help="calls per layer for --layer-times")
    args = parser.parse_args()
    if args.threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            THREAD_ENV[name] = str(args.threads)
        torch.set_num_threads(args.threads)
        from s3lora_cli.engine import kernels

        kernels.set_threads(args.threads)
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {args.device}"
    )
    if args.layer_times:
        layer_times(args.layer_times, args.ranks, args.repeats)
        return
    demo = ROOT / "s3lora_cli" / "demo"
    # start-up of a process that fits: PyTorch, numba and the kernels loaded, 16 layers of at most 64 x 64 scored
    startup = min(run_score(demo, "--device", args.device)[0] for _ in range(3))
    svd_startup = min(run_score(demo, "--method", "svd")[0] for _ in range(3))
    print(
        f"start-up: score --demo {startup:.2f} s, score --demo --method svd {svd_startup:.2f} s "
        "(fastest of 3 each; svd loads neither PyTorch nor the kernels)"
    )
    with tempfile.TemporaryDirectory(prefix="s3lora-bench-") as tmp:
        for case in args.cases:
            if case == "store":  # s3lora scan on a generated store: see scripts/bench_store.py
                print(f"\n[store] {args.store_size} adapters", flush=True)
                subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "scripts" / "bench_store.py"),
                        "--n",
                        str(args.store_size),
                        "--similar",
                    ],
                    check=True,
                    env=THREAD_ENV,
                )
                continue
            if case == "demo":
                adapter = demo
            else:
                start = time.perf_counter()
                adapter = write_adapter(Path(tmp) / case, case, args.blocks)
                size = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
                part = f" (the first {args.blocks} of {CASES[case][0]} blocks)" if args.blocks else ""
                print(f"\n[{case}] generated {size:.0f} MiB{part} in {time.perf_counter() - start:.1f} s")
            wall, rss, doc = run_score(adapter, "--device", args.device)
            n = len(doc["layers"])
            print(
                f"[{case}] mas-svd: {wall:.1f} s wall for {n} layers "
                f"({wall / n * 1000:.0f} ms/layer incl. start-up), peak RSS {rss:.0f} MiB, "
                f"max SSI {doc['summary']['max_ssi']:.4f}"
            )
            if args.floor:
                floor = floor_seconds(adapter)
                print(
                    f"[{case}] floor (M exact-kernel passes over every entry): {floor:.2f} s; "
                    f"score / floor = {wall / floor:.2f}x (start-up included)"
                )
            if args.concurrent > 1:
                walls = concurrent_walls(adapter, args.concurrent, "--device", args.device)
                print(
                    f"[{case}] {args.concurrent} processes at once: "
                    + ", ".join(f"{w:.1f}" for w in walls)
                    + f" s; slowest / alone = {max(walls) / wall:.2f}x (ideal on {os.cpu_count()} cores: "
                    f"{max(1.0, args.concurrent * min(1, 2 / max(os.cpu_count() or 1, 1))):.1f}x)"
                )
            if args.jobs:
                walls = jobs_walls(adapter, tuple(args.jobs), "--device", args.device)
                print(
                    f"[{case}] --jobs: "
                    + ", ".join(f"{n}: {w:.1f} s" for n, w in walls.items())
                    + " (first / each: "
                    + ", ".join(f"{walls[args.jobs[0]] / w:.2f}x" for w in walls.values())
                    + ")"
                )
            wall_svd, rss_svd, _ = run_score(adapter, "--device", args.device, "--method", "svd")
            print(
                f"[{case}] svd:     {wall_svd:.1f} s wall, peak RSS {rss_svd:.0f} MiB; "
                f"mas-svd / svd = {wall / wall_svd:.1f}x; the fit alone (mas-svd minus the start-up) "
                f"{(wall - startup) / n * 1000:.1f} ms/layer"
            )
            if args.blocks and case in CASES and args.blocks < CASES[case][0]:
                # start-up is paid once: the rest scales with the number of blocks
                full = startup + (wall - startup) * CASES[case][0] / args.blocks
                print(f"[{case}] extrapolated to all {CASES[case][0]} blocks: {full:.0f} s ({full / 60:.1f} min)")
            if not args.skip_ratios:
                r = sample_ratios(adapter, args.sample_layers, args.crop, args.device)
                line = (
                    f"[{case}] on {r['layers']} sampled layers: default {r['default']:.2f} s, exhaustive "
                    f"{r['exhaustive']:.2f} s (exhaustive / default = {r['exhaustive'] / r['default']:.1f}x), "
                    f"same picks on {r['same_picks']}/{r['layers']}"
                )
                print(line)
                speedup = r["reference"] / r["default_on_reference_layers"]
                print(
                    f"[{case}] dense float64 reference on the same layers cropped to at most "
                    f"{args.crop}x{args.crop}: {r['reference']:.2f} s vs default "
                    f"{r['default_on_reference_layers']:.3f} s (reference / default = {speedup:.0f}x), same picks on "
                    f"{r['same_picks_reference']}/{r['reference_layers']}, max relative SSI difference "
                    f"{r['max_rel_ssi_error_vs_reference']:.1e}"
                )


if __name__ == "__main__":
    main()
