"""Reader for diffusers LoRA files (``pytorch_lora_weights.safetensors``, or any single file in that layout):
tensor names start with the pipeline component (``unet.``, ``transformer.``, ``text_encoder.``,
``text_encoder_2.``, ...), then the module path as diffusers names it, then either PEFT-style factors
(``lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r], as ``save_lora_weights`` writes them) or the older
attention-processor factors (``lora.down.weight`` / ``lora.up.weight``, ``to_q_lora.down.weight``,
``lora_linear_layer.down.weight``).

Scaling, as diffusers' loader (``load_lora_adapter`` and ``get_peft_kwargs``) builds the LoraConfig:
1. the safetensors header holds ``lora_adapter_metadata`` (``save_lora_weights`` writes it from the trained
   LoraConfig, one ``<component>.<field>`` entry per field): scaling = lora_alpha / r per module, with that
   config's alpha_pattern and use_rslora;
2. else, a ``<component>.<module>.alpha`` tensor gives that module lora_alpha = alpha (diffusers' "network
   alphas"): scaling = alpha / r;
3. else lora_alpha = r: scaling = 1, dW = lora_B @ lora_A.
(StableDiffusionLoraLoaderMixin reads network alphas only from kohya-style files it converts; s3lora applies
rule 2 to every component, as diffusers' transformer pipelines do.)"""

from __future__ import annotations

import json
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
from s3lora_cli.adapters.config import AdapterConfig, lora_scaling, parse_config
from s3lora_cli.adapters.detect import DIFFUSERS_WEIGHTS, check_confined, resolve_snapshot
from s3lora_cli.adapters.kohya import alpha_value
from s3lora_cli.adapters.safetensors_io import PickleSource, SafetensorsSource
from s3lora_cli.errors import AdapterInputError

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors header entry where diffusers' save_lora_weights stores each component's LoraConfig."""

_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<proc>to_q|to_k|to_v|to_out)_lora\.(?P<proc_role>down|up)"
    r"|(?:lora|lora_linear_layer)\.(?P<old_role>down|up)"
    r"|(?P<peft_role>lora_A|lora_B|lora_magnitude_vector))(?:\.(?P<param>weight|bias))?$"
)
_ROLE = {"down": "A", "up": "B", "lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}


def module_of(match: re.Match) -> str:
    """The module a factor belongs to, as diffusers names it after converting old layouts to PEFT's: the
    attention processor's ``processor.to_q_lora`` is ``to_q``, ``to_out_lora`` is ``to_out.0``."""
    module = re.sub(r"\.processor$", "", match["module"]).replace(".processor.", ".")
    if match["proc"]:
        module += ".to_out.0" if match["proc"] == "to_out" else f".{match['proc']}"
    return module


class DiffusersAdapter(FactorFile):
    """A diffusers LoRA file opened for reading; see ``s3lora_cli.adapters.base.Adapter``."""

    format = "diffusers"

    def __init__(self, path: Path) -> None:
        self.path = path
        path = resolve_snapshot(path)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            if (path / DIFFUSERS_WEIGHTS).is_file():
                files = [path / DIFFUSERS_WEIGHTS]
            if len(files) != 1:
                raise AdapterInputError(
                    f"{path}: no {DIFFUSERS_WEIGHTS} (and {len(files)} other .safetensors files) "
                    "here; point s3lora at the LoRA weights file"
                )
            path = files[0]
        if not path.is_file():
            raise AdapterInputError(f"{path}: no such file")
        check_confined(path, path.parent)
        self.weights_path = path
        self._source = PickleSource(path) if path.suffix == ".bin" else SafetensorsSource(path)
        self._configs = self._metadata_configs()
        self.layers, self.skipped = self._index()
        raw = {prefix: cfg.raw for prefix, cfg in self._configs.items()}
        self.config = summary_config(self.layers, raw)

    def _metadata_configs(self) -> dict[str, AdapterConfig]:
        text = self._source.metadata.get(METADATA_KEY)
        if text is None:
            return {}
        try:
            flat = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, nested too deeply
            raise AdapterInputError(
                f"{self.weights_path}: the header's {METADATA_KEY} is not valid JSON "
                f"({getattr(exc, 'msg', type(exc).__name__)})"
            ) from None
        if not isinstance(flat, dict):
            raise AdapterInputError(f"{self.weights_path}: the header's {METADATA_KEY} is not a JSON object")
        grouped: dict[str, dict] = {}
        for key, value in flat.items():
            prefix, dot, field = str(key).partition(".")
            if dot:
                grouped.setdefault(prefix, {})[field] = value
        where = self.weights_path.with_name(f"{self.weights_path.name}[{METADATA_KEY}]")
        return {prefix: parse_config(raw, where) for prefix, raw in grouped.items()}

    def _index(self) -> tuple[tuple[LoraLayer, ...], tuple[SkippedTensor, ...]]:
        src = self._source
        parts: dict[str, dict[str, str]] = {}
        skipped = []
        for key in src.keys:
            m = _FACTOR.match(key)
            if m is not None:
                role = _ROLE[m["proc_role"] or m["old_role"] or m["peft_role"]]
                role += ".bias" if m["param"] == "bias" else ""
                module = module_of(m)
                entry = parts.setdefault(module, {})
                if role in entry:
                    raise AdapterInputError(
                        f"{self.weights_path}: module {module!r} has two {role} tensors ({entry[role]!r} and {key!r})"
                    )
                entry[role] = key
            elif key.endswith(".alpha"):
                parts.setdefault(key[: -len(".alpha")], {})["alpha"] = key
            else:
                skipped.append(
                    SkippedTensor(key, key.rpartition(".")[0], "not a LoRA factor; not analysed", src.shapes[key])
                )
        layers = []
        for module, keys in parts.items():
            if "A" not in keys and "B" not in keys:
                skipped.extend(
                    SkippedTensor(k, module, "an alpha without LoRA factors; not analysed", src.shapes[k])
                    for k in keys.values()
                )
                continue
            layers.append(self._layer(module, keys))
        if not layers:
            raise AdapterInputError(
                f"{self.weights_path}: no diffusers LoRA factors (lora_A / lora_B or lora.down / "
                f"lora.up) among {len(src.keys)} tensors"
            )
        return sorted_index(layers, skipped)

    def _layer(self, module: str, keys: dict[str, str]) -> LoraLayer:
        where = f"{self.weights_path}: module {module!r}"
        require_pair(where, keys, "lora_A", "lora_B")
        down, up = self._source.shapes[keys["A"]], self._source.shapes[keys["B"]]
        rank = down[0] if down else 0
        prefix, _, inner = module.partition(".")
        config = self._configs.get(prefix)
        notes = []
        if config is not None:
            alpha, rslora = config.rank_and_alpha(inner)[1], config.use_rslora
            notes.append(f"lora_alpha from the file's {METADATA_KEY}")
        elif "alpha" in keys:
            alpha, rslora = alpha_value(self._source, keys["alpha"]), False
        else:
            alpha, rslora = float(rank), False
        if "magnitude" in keys:
            notes.append("DoRA: scored the low-rank update B@A; the magnitude vector is not analysed")
        if "B.bias" in keys:
            notes.append("lora_B.bias present: a bias update, not part of dW, not analysed")
        scaling = lora_scaling(alpha, rank, rslora) if rank else 0.0
        return lowrank_layer(
            module, keys, down, up, alpha, scaling, self._source.dtypes[keys["B"]], where, tuple(notes)
        )
