"""The values every adapter reader produces: layer descriptors, skipped tensors, and the reader Protocol."""

from __future__ import annotations

import enum
import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from s3lora_cli.adapters.config import AdapterConfig
from s3lora_cli.adapters.safetensors_io import TensorSource
from s3lora_cli.errors import AdapterInputError

if TYPE_CHECKING:
    from typing_extensions import Self


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
    """What scoring needs from an opened adapter; a reader for a new format implements this.

    format: "peft-safetensors", "peft-bin", "kohya", "diffusers" or "mlx" (the JSON report's adapter.format).
    """

    path: Path
    weights_path: Path
    format: str
    config: AdapterConfig
    layers: tuple[LoraLayer, ...]
    skipped: tuple[SkippedTensor, ...]

    def sha256(self) -> str:
        """Hex sha256 of the weights file."""

    def load_factors(self, layer: LoraLayer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(left [d, r], right [r, k]) with dW = left @ right, scaling included, as NumPy arrays of ``dtype``
        ("float32" or "float64")."""

    def close(self) -> None:
        """Release the file."""


def sorted_index(
    layers: list[LoraLayer], skipped: list[SkippedTensor]
) -> tuple[tuple[LoraLayer, ...], tuple[SkippedTensor, ...]]:
    """A reader's layers by module path and its skipped tensors by key: the deterministic order of every output."""
    return tuple(sorted(layers, key=lambda layer: layer.module)), tuple(sorted(skipped, key=lambda s: s.key))


def require_pair(where: str, keys: dict[str, str], down: str, up: str) -> None:
    """Refuse a module with only one of its two factors (``down``/``up``: the format's names for A and B)."""
    if "A" not in keys or "B" not in keys:
        have, missing = (down, up) if "A" in keys else (up, down)
        raise AdapterInputError(f"{where} has {have} but no {missing}; the file is incomplete")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lowrank_factors(down: np.ndarray, up: np.ndarray, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(left [d, r], right [r, k]) with dW = left @ right = scaling * up @ down, for a LoRA stored the PEFT way
    round: ``down`` (lora_A, lora_down) [r, in] or [r, in, kh, kw], ``up`` (lora_B, lora_up) [out, r] or
    [out, r, 1, 1], both of the compute dtype. A convolution's kernel is flattened into the columns:
    k = in * kh * kw. The scaling multiplies in that dtype (a float32 product rounded once, as in PyTorch)."""
    return scaled(up.reshape(up.shape[0], -1), scaling), down.reshape(down.shape[0], -1)


def scaled(factor: np.ndarray, scaling: float) -> np.ndarray:
    """``scaling * factor`` in the factor's dtype (the scaling rounded to it first); past its range, inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return factor * factor.dtype.type(scaling)


def lowrank_layer(
    module: str,
    keys: dict[str, str],
    down_shape: tuple[int, ...],
    up_shape: tuple[int, ...],
    lora_alpha: float,
    scaling: float,
    dtype: str,
    where: str,
    notes: tuple[str, ...] = (),
) -> LoraLayer:
    """A LoraLayer from the shapes of a down (lora_A) [r, in] / [r, in, kh, kw] and up (lora_B) [out, r] /
    [out, r, 1, 1] pair, validated; ``where`` starts the error message (file and module)."""
    ok = (
        len(down_shape) in (2, 3, 4, 5)
        and len(up_shape) == len(down_shape)
        and all(s == 1 for s in up_shape[2:])
        and down_shape[0] == up_shape[1]
    )
    if not ok:
        raise AdapterInputError(
            f"{where}: down {list(down_shape)} and up {list(up_shape)} are not LoRA factor "
            "shapes (down [r, in(, kh, kw)], up [out, r(, 1, 1)])"
        )
    if 0 in down_shape or 0 in up_shape:
        raise AdapterInputError(f"{where}: empty tensors (down {list(down_shape)}, up {list(up_shape)})")
    kind = LayerKind.LINEAR if len(down_shape) == 2 else LayerKind.CONV
    shape = (up_shape[0], math.prod(down_shape[1:]))
    return LoraLayer(module, kind, shape, down_shape[0], lora_alpha, scaling, dtype, keys, notes)


def summary_config(
    layers: Sequence[LoraLayer], raw: dict | None = None, base_model: str | None = None
) -> AdapterConfig:
    """An AdapterConfig describing a format without PEFT's config file: r and lora_alpha are the most common over
    the layers (every layer keeps its own); ``raw`` keeps the format's own settings verbatim."""
    ranks = Counter(layer.r for layer in layers)
    alphas = Counter(layer.lora_alpha for layer in layers)
    r = ranks.most_common(1)[0][0] if ranks else 1
    alpha = alphas.most_common(1)[0][0] if alphas else float(r)
    return AdapterConfig(
        peft_type="LORA",
        r=r,
        lora_alpha=alpha,
        use_dora=any("magnitude" in la.keys for la in layers),
        base_model_name_or_path=base_model,
        raw=dict(raw or {}),
    )


class FactorFile:
    """What every reader of a file of low-rank factors shares (``Adapter``): the weights file's hash, loading a
    layer's factors stored the PEFT way round (keys "A" = down, "B" = up), closing. A subclass sets the
    ``Adapter`` attributes and ``_source``, and overrides ``load_factors`` where its layers are stored otherwise."""

    path: Path
    weights_path: Path
    format: str
    config: AdapterConfig
    layers: tuple[LoraLayer, ...]
    skipped: tuple[SkippedTensor, ...]
    _source: TensorSource

    def sha256(self) -> str:
        return file_sha256(self.weights_path)

    def load_factors(self, layer: LoraLayer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(left [d, r], right [r, k]) with dW = left @ right = scaling * up @ down."""
        get = self._source.get_float
        return lowrank_factors(get(layer.keys["A"], dtype), get(layer.keys["B"], dtype), layer.scaling)

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
