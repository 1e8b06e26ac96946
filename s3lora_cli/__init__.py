"""s3lora: audit LoRA adapters for sharp, risky updates with S3LoRA (MAS-SVD and the Spectral Sharpness Index).

    from s3lora_cli import score_adapter
    report = score_adapter("path/to/adapter")
    for layer in report.layers:
        print(layer.module, layer.ssi)
"""

__version__ = "0.1.0"

from s3lora_cli.adapters import open_adapter  # noqa: E402
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, S3LoraError, UsageError  # noqa: E402
from s3lora_cli.policy import Selection  # noqa: E402
from s3lora_cli.pruning import PruneMode, PruneResult, prune_adapter  # noqa: E402
from s3lora_cli.scoring import LayerScore, ScoreOptions, ScoreReport, score_adapter  # noqa: E402
from s3lora_cli.spectral import Method, Spectrum, mas_svd, ssi  # noqa: E402
from s3lora_cli.store import admit_adapter, scan_store  # noqa: E402

__all__ = [
    "__version__",
    "AdapterInputError",
    "LayerScore",
    "Method",
    "PruneMode",
    "PruneResult",
    "Selection",
    "RuntimeProblem",
    "S3LoraError",
    "ScoreOptions",
    "ScoreReport",
    "Spectrum",
    "UsageError",
    "admit_adapter",
    "mas_svd",
    "open_adapter",
    "prune_adapter",
    "scan_store",
    "score_adapter",
    "ssi",
]
