"""Small seeded PEFT-format adapters written straight to disk with safetensors (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def random_factors(out: int, inp: int, r: int, seed: int, sharp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, inp], B [out, r]); ``sharp`` makes B @ A nearly rank one."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, inp, generator=gen)
    b = torch.randn(out, r, generator=gen)
    if sharp:
        b[:, 0] *= 30.0
    return a, b


def config_dict(r: int = 4, lora_alpha: float = 8, **extra) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny/test-model",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(extra)
    return cfg


def write_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write adapter_model.safetensors (keys get the ``base_model.model.`` prefix) and adapter_config.json.

    Without ``tensors``: two blocks of q_proj (16x16) and v_proj (8x16), r = 4, block 1's v_proj sharp.
    """
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {}
        seed = 0
        for block in range(2):
            for proj, out in (("q_proj", 16), ("v_proj", 8)):
                seed += 1
                a, b = random_factors(out, 16, 4, seed, sharp=(block, proj) == (1, "v_proj"))
                stem = f"model.layers.{block}.self_attn.{proj}"
                tensors[f"{stem}.lora_A.weight"] = a
                tensors[f"{stem}.lora_B.weight"] = b
    stored = {PREFIX + k: v.to(dtype).contiguous() for k, v in tensors.items()}
    save_file(stored, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config if config is not None else config_dict()))
    return path


def layer_tensors(stem: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
