"""The public math entry: MAS-SVD, SSI and the ablation spectra of one LoRA update (takes tensors, returns tensors
or frozen dataclasses). The computation lives in the ``engine`` package, whose docstring describes it; this
module names what the rest of the package and users import."""

from s3lora_cli import engine
from s3lora_cli.engine import *  # noqa: F403  (the engine's public names, listed once in its __all__)

__all__ = engine.__all__
