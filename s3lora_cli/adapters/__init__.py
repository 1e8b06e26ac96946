"""All adapter file I/O: finding and opening adapters, lazy readers, and their value types."""

from __future__ import annotations

from pathlib import Path

from s3lora_cli.adapters.base import Adapter, LayerKind, LoraLayer, SkippedTensor
from s3lora_cli.adapters.config import AdapterConfig, lora_scaling, pattern_key
from s3lora_cli.adapters.peft import PeftAdapter

__all__ = ["Adapter", "AdapterConfig", "LayerKind", "LoraLayer", "SkippedTensor", "PeftAdapter", "lora_scaling",
           "open_adapter", "pattern_key"]


def open_adapter(path: str | Path) -> Adapter:
    """Open the adapter at ``path`` (a directory, or its weights file) for lazy, read-only access."""
    return PeftAdapter(Path(path))
