"""Measure what ``s3lora prune`` saves at inference: LoRA parameters and forward time of the original adapter,
the zero-pruned one (--mode zero) and the drop-pruned one (--mode drop), against the base model alone.

A random-initialised Llama-style model is built from a config (no download), LoRA r = 8 on q/k/v/o as in the
paper, every factor random and non-zero; the adapter is saved, pruned with the given tau, and each variant is
loaded with ``PeftModel.from_pretrained`` (unmerged, as it is served with adapters swapped at run time).
Forward passes are timed round-robin over the variants (so drift in a shared machine hits all alike) under
``torch.inference_mode``, by default in CPU time of this process on one thread, which other processes on a
shared machine disturb far less than wall time; the table gives the median of the repeats.

    python scripts/bench_prune.py [--layers 8] [--hidden 512] [--tau 10] [--repeats 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    return LlamaForCausalLM(config).eval()


def lora_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("process", "wall"),
        default="process",
        help="process: CPU time of this process (steady on a shared machine; use with --threads 1); "
        "wall: elapsed time (use on a GPU or a quiet machine)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--method",
        default="svd",
        help="scoring method; which layers go does not change the "
        "timing, only how many, and svd scores in milliseconds (mas-svd also works, slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from peft import LoraConfig, PeftModel, get_peft_model

    from s3lora_cli.pruning import PruneMode, prune_adapter
    from s3lora_cli.scoring import ScoreOptions
    from s3lora_cli.selection import Selection
    from s3lora_cli.spectral import Method

    base = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "adapter"
        config = LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )  # lora_B random too: every update is non-zero
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(src))
        options = ScoreOptions(method=Method(args.method), device="cpu")
        for mode in PruneMode:
            prune_adapter(src, Path(tmp) / mode.value, Selection.of(tau=args.tau), mode, options)
        variants = {"base model (no adapter)": copy.deepcopy(base)}
        for label, path in (
            ("original adapter", src),
            ("pruned, --mode zero", Path(tmp) / "zero"),
            ("pruned, --mode drop", Path(tmp) / "drop"),
        ):
            variants[label] = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
        variants = {k: v.to(args.device).eval() for k, v in variants.items()}

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    with torch.inference_mode():
        for model in variants.values():  # warm-up
            for _ in range(3):
                model(input_ids=ids)
        for _ in range(args.repeats):
            for label, model in variants.items():
                sync()
                start = clock()
                model(input_ids=ids)
                sync()
                times[label].append(clock() - start)

    total = sum(p.numel() for p in base.parameters())
    n_lora = 4 * args.layers
    original_ms = statistics.median(times["original adapter"]) * 1e3
    print(
        f"Llama-style, {args.layers} layers, hidden {args.hidden}, {total / 1e6:.1f}M base parameters; "
        f"LoRA r={args.r} on q/k/v/o ({n_lora} LoRA layers), --tau {args.tau} --method {args.method}; batch "
        f"{args.batch} x {args.seq} tokens on {args.device} ({torch.get_num_threads()} threads), {args.clock} time, "
        f"median of {args.repeats}\n"
    )
    print("| variant | LoRA layers | LoRA parameters | forward ms | vs original |")
    print("|---|---:|---:|---:|---:|")
    for label, model in variants.items():
        ms = statistics.median(times[label]) * 1e3
        layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
        print(f"| {label} | {layers} | {lora_parameters(model):,} | {ms:.2f} | {100 * (ms / original_ms - 1):+.1f} % |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
