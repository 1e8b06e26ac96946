"""Tiny random-initialised models (transformers from configs, plain torch) and helpers that wrap them with the
real PEFT library, give the LoRA factors seeded non-zero values, and save the adapter into a test directory.

Nothing here downloads anything: every model is built from a config with a fixed seed, at sizes (hidden 16,
one or two layers) that keep a whole test file well under a minute on two CPU cores.

Typical use::

    peft_model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    path = save_lora(peft_model, None, tmp_path / "adapter")
    for name, module in lora_modules(peft_model).items():
        expected = peft_delta(module)          # dW [d, k] in s3lora's orientation, float64
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even for a config lookup
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402

PEFT_PREFIX = "base_model.model."
VOCAB = 64


# ----------------------------------------------------------------------------------------------------------------
# Tiny base models


def tiny_llama(*, layers: int = 1, hidden: int = 16, vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM: q_proj/k_proj/v_proj/o_proj (16x16) and gate_proj/up_proj (32x16), down_proj (16x32)
    under ``model.layers.N``; ``model.embed_tokens`` (vocab x 16); untied ``lm_head``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(*, layers: int = 1, hidden: int = 16, vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    """A GPT2LMHeadModel: ``transformer.h.N.attn.c_attn`` is a Conv1D (weight stored in x out, 16 -> 48),
    ``attn.c_proj`` and ``mlp.c_fc`` / ``mlp.c_proj`` are Conv1D too; LoRA on them needs fan_in_fan_out=True."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_t5(*, layers: int = 1, hidden: int = 16, vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    """A T5ForConditionalGeneration: attention projections ``q``/``k``/``v``/``o`` under
    ``encoder.block.N.layer.0.SelfAttention`` and ``decoder.block.N.layer.{0,1}.{SelfAttention,EncDecAttention}``."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=hidden,
        d_kv=hidden // 2,
        d_ff=2 * hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bert(
    *, layers: int = 1, hidden: int = 16, vocab: int = VOCAB, num_labels: int = 2, seed: int = 0
) -> nn.Module:
    """A BertForSequenceClassification: ``bert.encoder.layer.N.attention.self.{query,key,value}`` (16x16) and a
    ``classifier`` head (num_labels x 16), the usual ``modules_to_save`` target."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_mixtral(
    *, layers: int = 1, hidden: int = 16, vocab: int = VOCAB, experts: int = 2, seed: int = 0
) -> nn.Module:
    """A MixtralForCausalLM: attention as ``tiny_llama``, a router ``model.layers.N.mlp.gate`` (experts x 16) and
    3-d expert parameters ``mlp.experts.gate_up_proj`` [experts, 64, 16] and ``mlp.experts.down_proj``
    [experts, 16, 32], which PEFT reaches only through ``target_parameters``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config).eval()


class TinyConvNet(nn.Module):
    """Conv2d(3->8, 3x3) ``conv``, Conv2d(8->8, 1x1) ``pointwise``, Conv2d(8->8, 3x3, groups=2) ``grouped``,
    Conv1d(8->6, k=3) ``conv1d`` and Linear(6->4) ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 3, h, w]
        x = self.grouped(self.pointwise(self.conv(x)).relu())
        x = self.conv1d(x.flatten(2)).mean(-1)
        return self.head(x)


def tiny_conv_net(*, seed: int = 0) -> TinyConvNet:
    """A TinyConvNet (plain torch, no transformers) for conv LoRA: targets ``conv``, ``pointwise``, ``grouped``,
    ``conv1d`` and ``head``."""
    torch.manual_seed(seed)
    return TinyConvNet().eval()


# ----------------------------------------------------------------------------------------------------------------
# PEFT wrapping, saving and reference deltas


def add_lora(
    model: nn.Module,
    lora_config: LoraConfig,
    *,
    adapter_name: str = "default",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> PeftModel:
    """``get_peft_model(model, lora_config, adapter_name)`` with every LoRA factor set to seeded N(0, 1) values:
    PEFT initialises lora_B (and lora_embedding_A) to zero, which would make every dW zero. lora_B biases and
    DoRA magnitudes are randomised too. ``dtype`` casts the adapter's trainable tensors (fp16 / bf16 adapters)."""
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".{adapter_name}" not in name or not any(
                role in name for role in ("lora_A", "lora_B", "lora_embedding_", "lora_magnitude_vector")
            ):
                continue
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))
            if "lora_magnitude_vector" in name:
                param.abs_().add_(0.5)  # a DoRA magnitude is a positive norm
            if dtype is not None:
                param.data = param.data.to(dtype)
    return peft_model


def save_lora(
    model: nn.Module,
    lora_config: LoraConfig | None,
    path: str | Path,
    *,
    adapter_name: str = "default",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **save_kwargs,
) -> Path:
    """Save a LoRA adapter as PEFT's ``save_pretrained`` writes it and return the directory that holds
    adapter_config.json and adapter_model.safetensors.

    ``model`` is a base model (wrapped first with ``add_lora(model, lora_config, ...)``) or a PeftModel that
    ``add_lora`` already returned (then ``lora_config`` is None). ``save_kwargs`` go to ``save_pretrained``
    (e.g. ``save_embedding_layers=True``, ``safe_serialization=False`` for adapter_model.bin). PEFT writes a
    non-default adapter into ``path/<adapter_name>``; that subdirectory is what is returned.
    """
    if lora_config is not None:
        model = add_lora(model, lora_config, adapter_name=adapter_name, seed=seed, dtype=dtype)
    elif not isinstance(model, PeftModel):
        raise TypeError("save_lora: pass a lora_config, or a PeftModel made by add_lora")
    path = Path(path)
    model.save_pretrained(str(path), selected_adapters=[adapter_name], **save_kwargs)
    return path if adapter_name == "default" else path / adapter_name


def save_raw_state_dict(
    peft_model: PeftModel, path: str | Path, *, adapter_name: str = "default", lora_only: bool = False
) -> Path:
    """Write ``peft_model.state_dict()`` as it is, keys unchanged (``...q_proj.lora_A.<adapter_name>.weight``,
    base weights such as ``...q_proj.base_layer.weight`` included unless ``lora_only``), to
    ``path/adapter_model.safetensors`` beside PEFT's adapter_config.json; return ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in peft_model.state_dict().items()}  # clone: no shared storage
    if lora_only:
        state = {k: v for k, v in state.items() if ".lora_" in k}
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config[adapter_name].save_pretrained(str(path))
    return path


def lora_modules(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, PeftLoraLayer]:
    """PEFT's LoRA layers holding ``adapter_name``, by module path without ``base_model.model.``
    (e.g. ``model.layers.0.self_attn.q_proj``), sorted by name."""
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, PeftLoraLayer) and adapter_name in module.r:
            found[name.removeprefix(PEFT_PREFIX)] = module
    return dict(sorted(found.items()))


def peft_delta(
    module: PeftLoraLayer, adapter_name: str = "default", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """PEFT's own ``get_delta_weight(adapter_name)`` computed in ``dtype`` on a copy of ``module``, put in
    s3lora's orientation: dW [out, in] for Linear (undoing fan_in_fan_out's transpose), [num_embeddings, dim] for
    Embedding, [out, in * prod(kernel)] for ConvNd (kernel flattened).

    Grouped convolutions are the exception: PEFT's get_delta_weight does not support groups > 1, so the delta
    is built here from the forward pass's definition: lora_B is block diagonal over the groups."""
    module = copy.deepcopy(module).to(dtype)
    base = module.get_base_layer()
    if isinstance(base, nn.modules.conv._ConvNd) and base.groups > 1:
        a = module.lora_A[adapter_name].weight.flatten(1)  # [r, in * prod(kernel)]
        b = module.lora_B[adapter_name].weight.flatten(1)  # [out, r / groups]
        groups, (out, rg) = base.groups, b.shape
        full = torch.zeros(out, rg * groups, dtype=dtype)
        for g in range(groups):
            rows = slice(g * out // groups, (g + 1) * out // groups)
            full[rows, g * rg : (g + 1) * rg] = b[rows]
        return module.scaling[adapter_name] * full @ a
    with torch.no_grad():
        delta = module.get_delta_weight(adapter_name)
    if isinstance(base, nn.modules.conv._ConvNd):
        return delta.reshape(delta.shape[0], -1)
    if getattr(module, "fan_in_fan_out", False):
        return delta.T
    return delta


def peft_delta_native(module: PeftLoraLayer, adapter_name: str = "default") -> torch.Tensor:
    """``get_delta_weight`` exactly as PEFT runs it, in the adapter's stored dtype (PEFT computes fp16 / bf16
    deltas in float32 on the CPU and rounds the result back), in s3lora's orientation as ``peft_delta``."""
    base = module.get_base_layer()
    with torch.no_grad():
        delta = module.get_delta_weight(adapter_name)
    if isinstance(base, nn.modules.conv._ConvNd):
        return delta.reshape(delta.shape[0], -1)
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


def delta_shape(module: PeftLoraLayer) -> tuple[int, int]:
    """(d, k) of dW in s3lora's orientation, from the base layer PEFT wrapped."""
    base = module.get_base_layer()
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.modules.conv._ConvNd):
        return base.out_channels, base.in_channels * math.prod(base.kernel_size)
    return module.out_features, module.in_features
