"""Reader for MLX-LM LoRA adapters: a directory holding ``adapters.safetensors`` (or a checkpoint such as
``0000100_adapters.safetensors``) and the ``adapter_config.json`` mlx_lm.lora writes.

mlx-lm (tuner/utils.py ``load_adapters`` / ``linear_to_lora_layers``, tuner/lora.py ``LoRALinear``) wraps, in the
last ``num_layers`` blocks of ``model.layers``, the modules named by ``lora_parameters.keys`` (or its per-model
defaults), with rank ``lora_parameters.rank`` and multiplier ``lora_parameters.scale``; ``fine_tune_type`` is
"lora", "dora" or "full". Tensors are named by the module path, e.g. ``model.layers.0.self_attn.q_proj.lora_a``
[in, r] and ``.lora_b`` [r, out]; DoRA adds ``.m`` [out]. The layer computes y = x W^T + scale * (x @ lora_a) @
lora_b, so dW = scale * (lora_a @ lora_b)^T [out, in]: ``scale`` is the multiplier itself, there is no alpha / r.
An embedding (``LoRAEmbedding``) adds scale * lora_a[ids] @ lora_b: dW = scale * lora_a @ lora_b [vocab, dim]."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from s3lora_cli.adapters.base import (
    FactorFile,
    LayerKind,
    LoraLayer,
    SkippedTensor,
    require_pair,
    scaled,
    sorted_index,
    summary_config,
)
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.adapters.detect import MLX_WEIGHTS, check_confined, resolve_snapshot
from s3lora_cli.adapters.safetensors_io import SafetensorsSource
from s3lora_cli.errors import AdapterInputError

_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_a|lora_b|m)$")
_ROLE = {"lora_a": "A", "lora_b": "B", "m": "magnitude"}
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embedding)$")


def read_mlx_config(path: Path) -> tuple[dict, int, float]:
    """(raw config, rank, scale) of an MLX-LM adapter_config.json; a full fine-tune is refused."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterInputError(
            f"{path} not found: an MLX-LM adapter holds adapter_config.json beside {MLX_WEIGHTS}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterInputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterInputError(f"{path}: expected a JSON object")
    kind = raw.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise AdapterInputError(f"{path}: fine_tune_type is {kind!r}; s3lora analyses LoRA / DoRA adapters")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterInputError(
            f"{path}: 'lora_parameters' (rank, scale, ...) is missing; mlx-lm needs it to load the adapter"
        )
    rank, scale = params.get("rank"), params.get("scale")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterInputError(f"{path}: lora_parameters.rank must be a positive integer, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterInputError(f"{path}: lora_parameters.scale must be a number, got {scale!r}")
    return raw, rank, float(scale)


class MlxAdapter(FactorFile):
    """An MLX-LM LoRA adapter opened for reading; see ``s3lora_cli.adapters.base.Adapter``."""

    format = "mlx"

    def __init__(self, path: Path) -> None:
        self.path = path
        path = resolve_snapshot(path)
        weights = path / MLX_WEIGHTS if path.is_dir() else path
        if not weights.is_file():
            raise AdapterInputError(f"{path}: no {MLX_WEIGHTS} here; point s3lora at an MLX-LM adapter directory")
        directory = weights.parent
        check_confined(weights, directory)
        if (directory / CONFIG_NAME).exists():
            check_confined(directory / CONFIG_NAME, directory)
        raw, self.rank, self.scale = read_mlx_config(directory / CONFIG_NAME)
        self.weights_path = weights
        self._source = SafetensorsSource(weights)
        self.layers, self.skipped = self._index()
        self.config = summary_config(self.layers, raw, raw.get("model") if isinstance(raw.get("model"), str) else None)

    def _index(self) -> tuple[tuple[LoraLayer, ...], tuple[SkippedTensor, ...]]:
        src = self._source
        parts: dict[str, dict[str, str]] = {}
        skipped = []
        for key in src.keys:
            m = _KEY.match(key)
            if m is None:
                skipped.append(
                    SkippedTensor(
                        key,
                        key.rpartition(".")[0],
                        "not a LoRA factor (full weights in the adapter file); not analysed",
                        src.shapes[key],
                    )
                )
                continue
            parts.setdefault(m["module"], {})[_ROLE[m["role"]]] = key
        layers = []
        for module, keys in parts.items():
            if "A" not in keys and "B" not in keys:
                skipped.extend(
                    SkippedTensor(k, module, "not a LoRA factor; not analysed", src.shapes[k]) for k in keys.values()
                )
                continue
            shapes = [src.shapes[k] for k in (keys.get("A"), keys.get("B")) if k]
            if any(len(s) == 3 for s in shapes):  # LoRASwitchLinear: one update per expert
                skipped.extend(
                    SkippedTensor(
                        k,
                        module,
                        "mixture-of-experts LoRA (one lora_a / lora_b pair per expert), not one dW; not analysed",
                        src.shapes[k],
                    )
                    for k in keys.values()
                )
                continue
            layers.append(self._layer(module, keys))
        if not layers:
            raise AdapterInputError(
                f"{self.weights_path}: no MLX-LM LoRA factors (.lora_a / .lora_b) among {len(src.keys)} tensors"
            )
        return sorted_index(layers, skipped)

    def _layer(self, module: str, keys: dict[str, str]) -> LoraLayer:
        where = f"{self.weights_path}: module {module!r}"
        require_pair(where, keys, "lora_a", "lora_b")
        a, b = self._source.shapes[keys["A"]], self._source.shapes[keys["B"]]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0] or 0 in a or 0 in b:
            raise AdapterInputError(
                f"{where}: lora_a {list(a)} and lora_b {list(b)} are not LoRA factor shapes "
                "(lora_a [in, r], lora_b [r, out])"
            )
        if a[1] != self.rank:
            raise AdapterInputError(
                f"{where}: the tensors have rank {a[1]} but adapter_config.json gives "
                f"lora_parameters.rank={self.rank}; the config does not belong to these weights"
            )
        embedding = bool(_EMBEDDING.search(module))
        kind = LayerKind.EMBEDDING if embedding else LayerKind.LINEAR
        notes = ["MLX-LM: dW = scale * (lora_a @ lora_b)^T, scale is the multiplier (no alpha / r)"]
        if "magnitude" in keys:
            notes.append("DoRA (.m): scored the low-rank update; the magnitude vector is not analysed")
        # lora_alpha reported as the alpha that gives PEFT's alpha / r the same scaling
        return LoraLayer(
            module,
            kind,
            (a[0], b[1]) if embedding else (b[1], a[0]),
            a[1],
            self.scale * a[1],
            self.scale,
            self._source.dtypes[keys["B"]],
            keys,
            tuple(notes),
        )

    def load_factors(self, layer: LoraLayer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(left [d, r], right [r, k]): scale * lora_b^T, lora_a^T for a linear layer; scale * lora_a, lora_b for
        an embedding."""
        a = self._source.get_float(layer.keys["A"], dtype)
        b = self._source.get_float(layer.keys["B"], dtype)
        if layer.kind is LayerKind.EMBEDDING:
            return scaled(a, layer.scaling), b
        return scaled(b.T, layer.scaling), np.ascontiguousarray(a.T)
