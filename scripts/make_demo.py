"""Write the bundled demo adapter (s3lora_cli/demo/): a tiny Llama-shaped PEFT LoRA adapter.

Four blocks of q, k, v, o projections (hidden 64, key/value 32), r = 8, lora_alpha = 16, stored in bf16.
Most updates are spread over all r directions; a few are dominated by one direction, as sharp updates are,
so the ranking has something to show. Deterministic: the same bytes every run.

    python scripts/make_demo.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, KV, R, ALPHA, BLOCKS = 64, 32, 8, 16, 4
SHARP = {("1", "v_proj"), ("2", "q_proj"), ("3", "o_proj")}


def factors(gen: torch.Generator, out: int, inp: int, sharp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(R, inp, generator=gen) / inp**0.5
    b = torch.randn(out, R, generator=gen) * 0.02
    if sharp:  # one direction carries most of the update
        b[:, 0] *= 12.0
        a[0] *= 3.0
    return a, b


def main(out_dir: Path) -> None:
    gen = torch.Generator().manual_seed(2508_15068)
    tensors = {}
    for block in range(BLOCKS):
        for proj, (out, inp) in {
            "q_proj": (HIDDEN, HIDDEN),
            "k_proj": (KV, HIDDEN),
            "v_proj": (KV, HIDDEN),
            "o_proj": (HIDDEN, HIDDEN),
        }.items():
            a, b = factors(gen, out, inp, (str(block), proj) in SHARP)
            prefix = f"base_model.model.model.layers.{block}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "s3lora-demo/tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": R,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(
        "# s3lora demo adapter\n\nA tiny, randomly generated Llama-shaped LoRA adapter (4 blocks x q, k, v, o; r = 8)\n"
        "for trying s3lora: `s3lora score --demo`. It was not trained and is not meant for a model.\n"
        "Regenerate it with `python scripts/make_demo.py`.\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "s3lora_cli" / "demo")
