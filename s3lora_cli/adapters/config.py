"""adapter_config.json: parsing, validation, and PEFT's per-module rank, alpha and scaling."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3lora_cli.errors import AdapterInputError

CONFIG_NAME = "adapter_config.json"


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_key(pattern_keys: list[str], module: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, as PEFT's
    ``get_pattern_key`` matches it: ``re.match(rf"(.*\\.)?({key})$", module)``; None if none does."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA adapter_config.json that scoring uses; ``raw`` keeps every key verbatim."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Any = None
    modules_to_save: Any = None
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and lora_alpha of one module, with ``rank_pattern`` / ``alpha_pattern`` applied as PEFT does."""
        r_key = pattern_key(list(self.rank_pattern), module)
        a_key = pattern_key(list(self.alpha_pattern), module)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return r, alpha

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return lora_scaling(alpha, r, self.use_rslora)


def _number(raw: dict, key: str, path: Path, *, integer: bool) -> Any:
    if key not in raw or raw[key] is None:
        raise AdapterInputError(f"{path}: '{key}' is missing; a LoRA adapter_config.json needs 'r' and 'lora_alpha'")
    value = raw[key]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise AdapterInputError(f"{path}: '{key}' must be {kind}, got {value!r}")
    return value


def _pattern(raw: dict, key: str, path: Path, *, integer: bool) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterInputError(f"{path}: '{key}' must be an object mapping module patterns to values")
    for pattern, item in value.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AdapterInputError(f"{path}: '{key}' has an invalid regular expression {pattern!r}: {exc}") from None
        _number({pattern: item}, pattern, path, integer=integer)
        if item <= 0 and integer:
            raise AdapterInputError(f"{path}: '{key}' gives rank {item} to {pattern!r}; ranks must be positive")
    return dict(value)


def parse_config(raw: Any, path: Path) -> AdapterConfig:
    """Validate a decoded adapter_config.json (a LoRA one) and return its AdapterConfig."""
    if not isinstance(raw, dict):
        raise AdapterInputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterInputError(f"{path}: peft_type is {peft_type!r}; s3lora analyses LoRA adapters (peft_type 'LORA')")
    r = _number(raw, "r", path, integer=True)
    if r <= 0:
        raise AdapterInputError(f"{path}: 'r' is {r}; the LoRA rank must be a positive integer")
    alpha = _number(raw, "lora_alpha", path, integer=False)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        peft_type="LORA",
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=_pattern(raw, "rank_pattern", path, integer=True),
        alpha_pattern=_pattern(raw, "alpha_pattern", path, integer=False),
        target_modules=raw.get("target_modules"),
        modules_to_save=raw.get("modules_to_save"),
        base_model_name_or_path=base if isinstance(base, str) else None,
        raw=raw,
    )


def read_config(path: Path) -> AdapterConfig:
    """Read and validate ``path`` (an adapter_config.json)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterInputError(
            f"{path} not found: a PEFT adapter directory holds adapter_config.json beside its weights"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterInputError(f"{path}: cannot be read ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterInputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    return parse_config(raw, path)
