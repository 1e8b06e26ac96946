"""Reader for PEFT LoRA adapters as ``save_pretrained`` writes them: adapter_config.json beside
adapter_model.safetensors (read lazily, one tensor at a time) or adapter_model.bin (weights_only)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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
)
from s3lora_cli.adapters.config import CONFIG_NAME, AdapterConfig, read_config
from s3lora_cli.adapters.detect import check_adapter_name, check_confined, resolve_snapshot
from s3lora_cli.adapters.safetensors_io import PickleSource, SafetensorsSource, TensorSource
from s3lora_cli.errors import AdapterInputError, UsageError

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# <module>.<role>[.<adapter name>][.weight|.bias]; PEFT omits the adapter name when it saves, but
# state dicts taken from a live model (or old tools) keep it, e.g. "q_proj.lora_A.default.weight".
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


def module_name(key_module: str) -> str:
    """PEFT's module path without the ``base_model.model.`` prefix."""
    return key_module[len(PEFT_PREFIX) :] if key_module.startswith(PEFT_PREFIX) else key_module


def locate(path: Path, adapter_name: str | None = None) -> tuple[Path, Path]:
    """(weights file, config file) of a PEFT adapter given as a directory, as its weights file, or as a Hugging Face
    cache folder; ``adapter_name`` picks one of several adapters saved in one directory (PEFT saves a non-default
    adapter under ``<directory>/<adapter_name>/``; "default" is the directory itself). Files that are symlinks
    leading outside the adapter directory are refused (a cache snapshot's links into its ``blobs/`` are allowed)."""
    adapter_name = check_adapter_name(adapter_name)
    if not path.exists():
        raise AdapterInputError(f"{path}: no such file or directory")
    path = resolve_snapshot(path)
    if not path.is_dir():
        if adapter_name is not None:
            raise UsageError(
                f"--adapter {adapter_name}: give the directory that holds the adapters, not a weights file"
            )
        if path.suffix not in (".safetensors", ".bin"):
            raise AdapterInputError(f"{path}: expected an adapter directory or a .safetensors / .bin weights file")
        config = path.parent / CONFIG_NAME
        check_confined(path, path.parent)
        if config.exists():
            check_confined(config, path.parent)
        return path, config
    nested = sorted(
        sub.name
        for sub in path.iterdir()
        if sub.is_dir()
        and not sub.name.startswith(".")
        and (sub / CONFIG_NAME).is_file()
        and any((sub / name).is_file() for name in (SAFETENSORS_NAME, BIN_NAME))
    )
    here = [name for name in (SAFETENSORS_NAME, BIN_NAME) if (path / name).is_file()]
    if adapter_name not in (None, "default") or (adapter_name == "default" and not here):
        if adapter_name not in nested:
            have = ", ".join((["default"] if here else []) + nested) or "none"
            raise AdapterInputError(f"{path}: no adapter named {adapter_name!r} here (adapters: {have})")
        check_confined(path / adapter_name, path)
        return locate(path / adapter_name)
    if here:
        weights, config = path / here[0], path / CONFIG_NAME
        check_confined(weights, path)
        if config.exists():
            check_confined(config, path)
        return weights, config
    if nested:
        raise AdapterInputError(
            f"{path}: no {SAFETENSORS_NAME} (or {BIN_NAME}) here, but {len(nested)} adapter(s) saved under their "
            f"adapter_name: {', '.join(nested)} (PEFT saves an adapter whose adapter_name is not 'default' under "
            f"<directory>/<adapter_name>); pick one with --adapter NAME"
        )
    raise AdapterInputError(
        f"{path}: no {SAFETENSORS_NAME} (or {BIN_NAME}) in this directory; point s3lora at a PEFT adapter "
        "directory as written by save_pretrained"
    )


@dataclass
class _Parts:
    keys: dict[str, str]
    adapter_names: set
    embedding: bool = False


class PeftAdapter(FactorFile):
    """A PEFT LoRA adapter opened for reading; see ``s3lora_cli.adapters.base.Adapter``."""

    def __init__(self, path: Path, adapter_name: str | None = None) -> None:
        self.path = path
        self.weights_path, config_path = locate(path, adapter_name)
        self.config: AdapterConfig = read_config(config_path)
        self.format = "peft-safetensors" if self.weights_path.suffix == ".safetensors" else "peft-bin"
        source: TensorSource
        if self.format == "peft-bin":
            source = PickleSource(self.weights_path)
        else:
            source = SafetensorsSource(self.weights_path)
        self._source = source
        self.layers, self.skipped = self._index()

    def _index(self) -> tuple[tuple[LoraLayer, ...], tuple[SkippedTensor, ...]]:
        parts: dict[str, _Parts] = {}
        skipped = []
        src = self._source
        for key in src.keys:
            m = _KEY.match(key)
            if m is None:
                owner = _owner(key)
                skipped.append(SkippedTensor(key, owner, _skip_reason(key, owner, self.config), src.shapes[key]))
                continue
            role = {
                "lora_A": "A",
                "lora_B": "B",
                "lora_embedding_A": "A",
                "lora_embedding_B": "B",
                "lora_magnitude_vector": "magnitude",
            }[m["role"]]
            if m["param"] == "bias":
                role += ".bias"
            entry = parts.setdefault(m["module"], _Parts({}, set()))
            if m["adapter"]:
                entry.adapter_names.add(m["adapter"])
            if role in entry.keys:
                raise AdapterInputError(
                    f"{self.weights_path}: module {module_name(m['module'])!r} has two {m['role']} tensors "
                    f"({entry.keys[role]!r} and {key!r}); several adapters in one file are not supported"
                )
            entry.keys[role] = key
            entry.embedding |= m["role"].startswith("lora_embedding")
        layers = []
        for mod, entry in parts.items():
            packed = self._packed_experts(module_name(mod), entry)
            if packed:
                skipped.extend(packed)
            else:
                layers.append(self._layer(module_name(mod), entry))
        if not layers and parts:
            reasons = sorted({item.reason for item in skipped if item.reason.startswith("target_parameters")})
            raise AdapterInputError(f"{self.weights_path}: no LoRA layer that s3lora can analyse: {'; '.join(reasons)}")
        if not layers:
            raise AdapterInputError(
                f"{self.weights_path}: no LoRA tensors (lora_A / lora_B) found among {len(src.keys)} tensors"
            )
        return sorted_index(layers, skipped)

    def _packed_experts(self, module: str, entry: _Parts) -> list[SkippedTensor]:
        """The tensors of a ``target_parameters`` LoRA on a 3-d (mixture-of-experts) parameter, to be listed as
        skipped: PEFT's ParamWrapper packs one rank-r update per expert into lora_A [E*r, in] / lora_B [out, E*r],
        E matrices rather than one dW. Empty for every other module."""
        targets = self.config.raw.get("target_parameters")
        if not isinstance(targets, list) or entry.embedding or not {"A", "B"} <= set(entry.keys):
            return []
        # PEFT nests one ParamWrapper per targeted parameter of a module: "experts", "experts.base_layer", ...
        owner = "." + re.sub(r"(\.base_layer)+$", "", module)
        parents = [t.rpartition(".")[0] for t in targets if isinstance(t, str)]
        if not any(not parent or owner.endswith("." + parent) for parent in parents):
            return []
        a_shape, b_shape = self._source.shapes[entry.keys["A"]], self._source.shapes[entry.keys["B"]]
        r, _ = self.config.rank_and_alpha(module)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] <= r or a_shape[0] % r:
            return []
        reason = (
            f"target_parameters ({', '.join(map(str, targets))}): {a_shape[0] // r} experts' rank-{r} "
            "updates packed in one lora_A / lora_B pair, not one dW; not analysed"
        )
        return [SkippedTensor(key, module, reason, self._source.shapes[key]) for key in entry.keys.values()]

    def _layer(self, module: str, entry: _Parts) -> LoraLayer:
        keys, embedding = dict(entry.keys), entry.embedding
        where = f"{self.weights_path}: module {module!r}"
        require_pair(where, keys, "lora_A", "lora_B")
        a_shape, b_shape = self._source.shapes[keys["A"]], self._source.shapes[keys["B"]]
        if embedding:
            kind = LayerKind.EMBEDDING
            ok = len(a_shape) == 2 and len(b_shape) == 2
            rank, rank_b = (a_shape[0], b_shape[1]) if ok else (0, -1)
            shape = (a_shape[1], b_shape[0]) if ok else (0, 0)
        else:
            ok = len(a_shape) >= 2 and len(b_shape) == len(a_shape) and all(s == 1 for s in b_shape[2:])
            kind = LayerKind.LINEAR if len(a_shape) == 2 else LayerKind.CONV
            rank, rank_b = (a_shape[0], b_shape[1]) if ok else (0, -1)
            shape = (b_shape[0], math.prod(a_shape[1:])) if ok else (0, 0)
        if not ok:
            raise AdapterInputError(
                f"{where}: lora_A {list(a_shape)} and lora_B {list(b_shape)} are not LoRA factor shapes"
            )
        groups = 1
        if kind is LayerKind.CONV and 0 < rank_b < rank and rank % rank_b == 0 and b_shape[0] % (rank // rank_b) == 0:
            # PEFT builds lora_B of a grouped ConvNd with the base layer's groups: [out, r / groups, 1...]
            groups, rank_b = rank // rank_b, rank
        if rank != rank_b:
            raise AdapterInputError(
                f"{where}: inner ranks disagree, lora_A has {rank} rows but lora_B has {rank_b} columns"
            )
        if rank == 0 or 0 in shape:
            raise AdapterInputError(f"{where}: empty tensors (lora_A {list(a_shape)}, lora_B {list(b_shape)})")
        r_config, alpha = self.config.rank_and_alpha(module)
        if r_config != rank:
            raise AdapterInputError(
                f"{where}: the tensors have rank {rank} but adapter_config.json gives r={r_config} for it "
                "(r / rank_pattern); the config does not belong to these weights"
            )
        notes = []
        if "magnitude" in keys:
            notes.append("DoRA: scored the low-rank update B@A; the magnitude vector is not analysed")
        if "B.bias" in keys:
            notes.append("lora_B.bias present: a bias update, not part of dW, not analysed")
        if "A.bias" in keys:
            notes.append("lora_A.bias present: not part of dW, not analysed")
        if groups > 1:
            notes.append(
                f"grouped convolution (groups={groups}): lora_B is block diagonal over the groups; "
                "dW maps all input channels, so it does not merge into the base weight"
            )
        if entry.adapter_names:
            notes.append(f"adapter name in keys: {', '.join(sorted(entry.adapter_names))}")
        dtype = self._source.dtypes[keys["B"]]
        scaling = self.config.scaling(module)
        return LoraLayer(module, kind, shape, rank, alpha, scaling, dtype, keys, tuple(notes), groups)

    def load_factors(self, layer: LoraLayer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(left [d, r], right [r, k]) with dW = left @ right = scaling * B @ A in the spec's orientation."""
        a = self._source.get_float(layer.keys["A"], dtype)
        b = self._source.get_float(layer.keys["B"], dtype)
        if layer.kind is LayerKind.EMBEDDING:  # dW = scaling * (B @ A)^T = (scaling * A^T) @ B^T
            return scaled(a.T, layer.scaling), np.ascontiguousarray(b.T)
        b = b.reshape(b.shape[0], -1)
        if layer.groups > 1:  # group g's outputs read only channels g * r/G .. (g+1) * r/G - 1 of lora_A's output
            size = -(-b.shape[0] // layer.groups)  # as torch.chunk splits
            b = block_diagonal([b[i : i + size] for i in range(0, b.shape[0], size)])
        return scaled(b, layer.scaling), a.reshape(a.shape[0], -1)


def block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """The blocks along the diagonal of one matrix, zeros elsewhere (``torch.block_diag``)."""
    rows, cols = sum(x.shape[0] for x in blocks), sum(x.shape[1] for x in blocks)
    out = np.zeros((rows, cols), dtype=blocks[0].dtype)
    i = j = 0
    for x in blocks:
        out[i : i + x.shape[0], j : j + x.shape[1]] = x
        i, j = i + x.shape[0], j + x.shape[1]
    return out


# Wrappers PEFT puts between a module and its parameters; a raw model.state_dict() keeps them in the keys:
# "<module>.base_layer.weight" (a LoRA-wrapped layer's own weights), "<module>.modules_to_save.<adapter>.weight"
# and "<module>.original_module.weight" (modules_to_save), "<module>.token_adapter.trainable_tokens_delta".
_WRAPPER = re.compile(r"\.(?:base_layer|modules_to_save|original_module|token_adapter)(?:\.|$)")


def _owner(key: str) -> str:
    """The module a non-LoRA tensor belongs to, by PEFT's module path: the key without its parameter name,
    PEFT's wrappers and ``base_model.model.``."""
    wrapped = _WRAPPER.search(key)
    return module_name(key[: wrapped.start()] if wrapped else key.rpartition(".")[0])


def _skip_reason(key: str, owner: str, config: AdapterConfig) -> str:
    saved = config.modules_to_save or []
    if isinstance(saved, str):
        saved = [saved]
    if ".trainable_tokens_delta" in key:
        return "trainable_token_indices: trained rows of selected token embeddings, not a LoRA update"
    if ".original_module." in key:
        return "modules_to_save: the base model's original copy of the module, not a LoRA update"
    # PEFT's _set_trainable picks modules_to_save by a plain suffix test on the module path
    if ".modules_to_save." in key or any(owner.endswith(name) for name in saved if isinstance(name, str)):
        return "modules_to_save: a full trained copy of the module, not a LoRA update"
    if ".base_layer." in key:
        return "full base weights shipped with the adapter (e.g. resized embeddings), not a LoRA update"
    return "not a LoRA factor (full weights shipped in the adapter file)"
