"""Reader for kohya-ss / LyCORIS LoRA files: one .safetensors file holding, per module, ``<name>.lora_down.weight``
[r, in] (or [r, in, kh, kw] for a convolution), ``<name>.lora_up.weight`` [out, r] (or [out, r, 1, 1]) and
``<name>.alpha``; module names as kohya writes them (``lora_unet_...``, ``lora_te_...``, ``lora_te1_...``).

Scaling (kohya-ss networks/lora.py, LyCORIS): dW = (alpha / r) * up @ down; a module without ``.alpha`` has
alpha = r (scale 1). LoHa (``hada_*``), LoKr (``lokr_*``), Tucker-decomposed convolutions (``lora_mid``) and
full differences (``diff``) are not a rank-r up @ down and are listed as skipped."""

from __future__ import annotations

import re
from pathlib import Path

from s3lora_cli.adapters.base import (
    FactorFile,
    LoraLayer,
    SkippedTensor,
    lowrank_layer,
    require_pair,
    sorted_index,
    summary_config,
)
from s3lora_cli.adapters.config import lora_scaling
from s3lora_cli.adapters.detect import check_confined
from s3lora_cli.adapters.safetensors_io import SafetensorsSource, TensorSource
from s3lora_cli.errors import AdapterInputError

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "dora_scale": "magnitude"}
_OTHER = {
    "hada_": "LoHa (Hadamard product of two low-rank pairs): not a rank-r up @ down; not analysed",
    "lokr_": "LoKr (Kronecker product): not a rank-r up @ down; not analysed",
    "lora_mid": "Tucker-decomposed convolution (lora_mid): not a plain rank-r up @ down; not analysed",
    "diff": "a full weight difference, not a low-rank factor; not analysed",
}


def alpha_value(source: TensorSource, key: str) -> float:
    """The scalar ``.alpha`` of a module (stored as a 0-d or one-element tensor)."""
    values = source.get_float(key, "float32")
    if values.size != 1:
        raise AdapterInputError(f"{source.path}: {key!r} has shape {list(values.shape)}; alpha is one number")
    value = float(values.reshape(-1)[0])
    if not value == value or value in (float("inf"), float("-inf")):
        raise AdapterInputError(f"{source.path}: {key!r} is {value}; alpha must be a finite number")
    return value


class KohyaAdapter(FactorFile):
    """A kohya-ss / LyCORIS LoRA file opened for reading; see ``s3lora_cli.adapters.base.Adapter``."""

    format = "kohya"

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            if len(files) != 1:
                raise AdapterInputError(
                    f"{path}: expected one kohya .safetensors file here, found {len(files)}; point s3lora at the file"
                )
            path = files[0]
        if not path.is_file():
            raise AdapterInputError(f"{path}: no such file")
        check_confined(path, path.parent)
        self.path = path
        self.weights_path = path
        self._source = SafetensorsSource(path)
        self.layers, self.skipped = self._index()
        self.config = summary_config(self.layers, self._source.metadata, self._source.metadata.get("ss_sd_model_name"))

    def _index(self) -> tuple[tuple[LoraLayer, ...], tuple[SkippedTensor, ...]]:
        src = self._source
        parts: dict[str, dict[str, str]] = {}
        skipped = []
        for key in src.keys:
            m = _KEY.match(key)
            if m is None:
                owner, _, param = key.partition(".")
                reason = next(
                    (text for prefix, text in _OTHER.items() if param.startswith(prefix)),
                    "not a LoRA factor; not analysed",
                )
                skipped.append(SkippedTensor(key, owner, reason, src.shapes[key]))
                continue
            parts.setdefault(m["module"], {})[_ROLES[m["role"]]] = key
        lycoris = {s.module for s in skipped}
        layers = []
        for module, keys in parts.items():
            if module in lycoris or not {"A", "B"} & set(keys):
                # an alpha (or dora_scale) of a LoHa / LoKr module: it belongs with its skipped factors
                skipped.extend(
                    SkippedTensor(
                        k, module, "belongs to a module that is not a LoRA up @ down; not analysed", src.shapes[k]
                    )
                    for k in keys.values()
                )
                continue
            layers.append(self._layer(module, keys))
        if not layers:
            kinds = sorted({s.reason.split(":")[0] for s in skipped})
            raise AdapterInputError(
                f"{self.weights_path}: no LoRA (lora_down / lora_up) module that s3lora can "
                f"analyse among {len(src.keys)} tensors ({'; '.join(kinds) or 'none'})"
            )
        return sorted_index(layers, skipped)

    def _layer(self, module: str, keys: dict[str, str]) -> LoraLayer:
        where = f"{self.weights_path}: module {module!r}"
        require_pair(where, keys, "lora_down", "lora_up")
        down, up = self._source.shapes[keys["A"]], self._source.shapes[keys["B"]]
        rank = down[0] if down else 0
        notes = []
        if "alpha" in keys:
            alpha = alpha_value(self._source, keys["alpha"])
        else:
            alpha = float(rank)
            notes.append("no .alpha: alpha = r (scale 1), as kohya-ss loads it")
        if "magnitude" in keys:
            notes.append("DoRA (dora_scale): scored the low-rank update up @ down; the magnitude is not analysed")
        scaling = lora_scaling(alpha, rank, False) if rank else 0.0
        return lowrank_layer(
            module, keys, down, up, alpha, scaling, self._source.dtypes[keys["B"]], where, tuple(notes)
        )
