"""The values every adapter reader produces: layer descriptors, skipped tensors, and the reader Protocol."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from s3lora_cli.adapters.config import AdapterConfig


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    EMBEDDING = "embedding"
    CONV = "conv"


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA layer of an adapter, described without loading its tensors.

    module: PEFT's module path without ``base_model.model.``, e.g. ``model.layers.0.self_attn.q_proj``.
    shape: (d, k) of dW: d output features (rows), k input features (columns); for embeddings
        (num_embeddings, dim); for convolutions (out, in * prod(kernel)).
    r: the rank read from the tensors. lora_alpha and scaling: from the config, patterns applied.
    keys: the tensor names in the weights file, by role: "A", "B", and where present "B.bias",
        "magnitude" (DoRA).
    groups: for a LoRA conv on a grouped convolution (PEFT gives lora_B the base layer's ``groups``), the
        number of groups G: lora_B is stored [out, r / G, 1...] and acts as a block-diagonal [out, r] matrix.
        1 for every other layer.
    """

    module: str
    kind: LayerKind
    shape: tuple[int, int]
    r: int
    lora_alpha: float
    scaling: float
    dtype: str
    keys: dict[str, str]
    notes: tuple[str, ...] = ()
    groups: int = 1


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor of the weights file that is not a LoRA factor, and why it is not analysed."""

    key: str
    module: str
    reason: str
    shape: tuple[int, ...]


class Adapter(Protocol):
    """What scoring needs from an opened adapter; a reader for a new format implements this."""

    path: Path
    weights_path: Path
    format: str
    config: AdapterConfig
    layers: tuple[LoraLayer, ...]
    skipped: tuple[SkippedTensor, ...]

    def sha256(self) -> str:
        """Hex sha256 of the weights file."""

    def load_factors(self, layer: LoraLayer, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [d, r], right [r, k]) with dW = left @ right, scaling included, in ``dtype`` on ``device``."""

    def close(self) -> None:
        """Release the file."""
