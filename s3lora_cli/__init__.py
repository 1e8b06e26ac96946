"""s3lora: audit LoRA adapters for sharp, risky updates with S3LoRA (MAS-SVD and the Spectral Sharpness Index).

    from s3lora_cli import score_adapter
    report = score_adapter("path/to/adapter")
    for layer in report.layers:
        print(layer.module, layer.ssi)

The public names are imported on first use, so that ``s3lora --help`` does not load PyTorch.
"""

from __future__ import annotations

import importlib

from s3lora_cli._version import __version__

_PUBLIC = {
    "open_adapter": "s3lora_cli.adapters",
    "AdapterInputError": "s3lora_cli.errors",
    "RuntimeProblem": "s3lora_cli.errors",
    "S3LoraError": "s3lora_cli.errors",
    "UsageError": "s3lora_cli.errors",
    "Selection": "s3lora_cli.selection",
    "PruneMode": "s3lora_cli.pruning",
    "PruneResult": "s3lora_cli.pruning",
    "prune_adapter": "s3lora_cli.pruning",
    "LayerScore": "s3lora_cli.scoring",
    "ScoreOptions": "s3lora_cli.scoring",
    "ScoreReport": "s3lora_cli.scoring",
    "score_adapter": "s3lora_cli.scoring",
    "Method": "s3lora_cli.spectral",
    "Spectrum": "s3lora_cli.spectral",
    "mas_svd": "s3lora_cli.engine",
    "ssi": "s3lora_cli.spectral",
    "admit_adapter": "s3lora_cli.store",
    "scan_store": "s3lora_cli.store",
}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 's3lora_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
