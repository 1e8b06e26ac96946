"""All adapter file I/O: finding and opening adapters, lazy readers, and their value types."""

from __future__ import annotations

from pathlib import Path

from s3lora_cli.adapters.base import Adapter, LayerKind, LoraLayer, SkippedTensor
from s3lora_cli.adapters.config import AdapterConfig, lora_scaling, pattern_key
from s3lora_cli.adapters.detect import FORMATS, check_adapter_name, check_format_name, detect_format, find_adapters
from s3lora_cli.adapters.diffusers import DiffusersAdapter
from s3lora_cli.adapters.kohya import KohyaAdapter
from s3lora_cli.adapters.mlx import MlxAdapter
from s3lora_cli.adapters.peft import PeftAdapter
from s3lora_cli.errors import AdapterInputError, UsageError

__all__ = [
    "Adapter",
    "AdapterConfig",
    "DiffusersAdapter",
    "FORMATS",
    "KohyaAdapter",
    "LayerKind",
    "LoraLayer",
    "MlxAdapter",
    "PeftAdapter",
    "SkippedTensor",
    "detect_format",
    "find_adapters",
    "lora_scaling",
    "open_adapter",
    "pattern_key",
]

_READERS = {"kohya": KohyaAdapter, "diffusers": DiffusersAdapter, "mlx": MlxAdapter}


def open_adapter(path: str | Path, input_format: str | None = None, adapter_name: str | None = None) -> Adapter:
    """Open the adapter at ``path`` (a directory, or its weights file) for lazy, read-only access.

    ``input_format``: None or "auto" detects the format from file names, config fields and tensor names; else
    one of FORMATS. ``adapter_name`` picks one of several PEFT adapters saved in one directory (PEFT saves a
    non-default adapter under ``<directory>/<adapter_name>/``)."""
    path = Path(path)
    fmt = check_format_name(input_format)
    check_adapter_name(adapter_name)
    if fmt is None:
        return _open(path, detect_format(path), adapter_name)
    try:
        return _open(path, fmt, adapter_name)
    except AdapterInputError as exc:
        try:
            detected = detect_format(path)
        except AdapterInputError:
            raise exc from None
        if detected == fmt:
            raise
        raise AdapterInputError(
            f"{exc}; --input-format {fmt} was given, but this looks like a {detected} adapter (try --input-format auto)"
        ) from None


def _open(path: Path, fmt: str, adapter_name: str | None) -> Adapter:
    if fmt == "peft":
        return PeftAdapter(path, adapter_name)
    if adapter_name is not None:
        raise UsageError(
            f"--adapter {adapter_name}: only PEFT saves several named adapters in one directory; "
            f"this is a {fmt} adapter"
        )
    return _READERS[fmt](path)
