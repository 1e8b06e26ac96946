"""The same LoRA update written in each format s3lora reads: kohya-ss, diffusers (PEFT-style and attention-processor
keys) and MLX-LM, converted from one seeded PEFT adapter of adapter_factory; plus a Hugging Face cache layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from adapter_factory import PREFIX, config_dict, random_factors, write_adapter
from safetensors.torch import load_file, save_file


def peft_factors(peft_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """{module: (A [r, in], B [out, r])} and the config of a PEFT adapter written by adapter_factory."""
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem = key.removeprefix(PREFIX)
        module, _, role = stem.rpartition(".lora_")
        modules.setdefault(module, {})[role.split(".")[0]] = value
    return {m: (t["A"], t["B"]) for m, t in modules.items()}, config


def kohya_name(module: str, prefix: str = "lora_unet_") -> str:
    return prefix + module.replace(".", "_")


def to_kohya(peft_dir: Path, out: Path, *, alpha: bool = True, prefix: str = "lora_unet_") -> Path:
    """A kohya-ss file: ``lora_unet_<module with _>.lora_down.weight`` = A, ``.lora_up.weight`` = B, ``.alpha``."""
    factors, config = peft_factors(peft_dir)
    tensors = {}
    for module, (a, b) in factors.items():
        name = kohya_name(module, prefix)
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        if alpha:
            tensors[f"{name}.alpha"] = torch.tensor(float(config["lora_alpha"]), dtype=a.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_network_dim": str(config["r"]), "ss_sd_model_name": "tiny"})
    return out


def to_diffusers(
    peft_dir: Path, out: Path, *, layout: str = "peft", scale_with: str = "alpha", component: str = "unet"
) -> Path:
    """A diffusers LoRA file: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (layout "peft") or
    ``.lora.down.weight`` / ``.lora.up.weight`` (layout "old"); the scale alpha / r given by ``.alpha`` tensors
    (scale_with "alpha"), by the header's lora_adapter_metadata ("metadata"), or by nothing ("none": scale 1)."""
    factors, config = peft_factors(peft_dir)
    down, up = ("lora_A", "lora_B") if layout == "peft" else ("lora.down", "lora.up")
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{component}.{module}.{down}.weight"] = a
        tensors[f"{component}.{module}.{up}.weight"] = b
        if scale_with == "alpha":
            tensors[f"{component}.{module}.alpha"] = torch.tensor(float(config["lora_alpha"]))
    metadata = {"format": "pt"}
    if scale_with == "metadata":
        lora_config = {
            "peft_type": "LORA",
            "r": config["r"],
            "lora_alpha": config["lora_alpha"],
            "target_modules": sorted({m.rpartition(".")[2] for m in factors}),
            "use_rslora": False,
        }
        metadata["lora_adapter_metadata"] = json.dumps({f"{component}.{k}": v for k, v in lora_config.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def to_mlx(peft_dir: Path, out_dir: Path, **lora_parameters) -> Path:
    """An MLX-LM adapter directory: ``<module>.lora_a`` = A^T [in, r], ``.lora_b`` = B^T [r, out], and
    lora_parameters.scale = lora_alpha / r."""
    factors, config = peft_factors(peft_dir)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{module}.lora_a"] = a.T.contiguous()
        tensors[f"{module}.lora_b"] = b.T.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapters.safetensors"), metadata={"format": "mlx"})
    params = {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0, **lora_parameters}
    mlx_config = {"model": "tiny/test-model", "fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}
    (out_dir / "adapter_config.json").write_text(json.dumps(mlx_config, indent=2))
    return out_dir


def kohya_conv_file(out: Path, *, alpha: float | None = 2.0) -> Path:
    """A kohya LoCon file: one linear module and one 3x3 convolution (lora_down [r, in, 3, 3], lora_up
    [out, r, 1, 1]), plus a LoHa and a LoKr module."""
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 16, generator=gen),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 4, generator=gen),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(4, 8, 3, 3, generator=gen),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(8, 4, 1, 1, generator=gen),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.randn(8, 2, generator=gen),
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": torch.randn(2, 8, generator=gen),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_unet_mid_block_attentions_0_proj_out.lokr_w1": torch.randn(2, 2, generator=gen),
        "lora_unet_mid_block_attentions_0_proj_out.lokr_w2": torch.randn(4, 4, generator=gen),
    }
    if alpha is not None:
        tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] = torch.tensor(alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def hf_cache(
    peft_dir: Path,
    cache_root: Path,
    repo: str = "models--org--tiny-lora",
    revision: str = "0123456789abcdef0123456789abcdef01234567",
) -> Path:
    """A Hugging Face cache repository holding ``peft_dir``: files in ``blobs/`` named by a hash, and
    ``snapshots/<revision>/`` made of relative symlinks into them; returns the snapshot directory."""
    repo_dir = cache_root / repo
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / revision
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    for i, file in enumerate(sorted(peft_dir.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def small_peft(path: Path, r: int = 4, lora_alpha: float = 8, blocks: int = 2) -> Path:
    """A PEFT adapter of ``blocks`` blocks of q_proj (16x16) and v_proj (8x16), block 1's v_proj sharp."""
    tensors = {}
    seed = 0
    for block in range(blocks):
        for proj, out in (("q_proj", 16), ("v_proj", 8)):
            seed += 1
            a, b = random_factors(out, 16, r, seed, sharp=(block, proj) == (1, "v_proj"))
            tensors[f"model.layers.{block}.self_attn.{proj}.lora_A.weight"] = a
            tensors[f"model.layers.{block}.self_attn.{proj}.lora_B.weight"] = b
    return write_adapter(path, tensors, config_dict(r=r, lora_alpha=lora_alpha))
