"""Text embeddings for the Trigger's semantic signal and the Trigger Buffer: the mean-pooled last hidden states of
a model (the causal LM itself by default, or an encoder directory such as a sentence-transformers model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s3lora_cli.errors import AdapterInputError


class Embedder(Protocol):
    """Maps texts to vectors: ``embed(texts) -> [len(texts), dim]`` float32, the same vector for the same text."""

    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def mean_pool(hidden, attention_mask):
    """Mean of each sequence's hidden states over its real tokens. hidden: [batch, seq, dim]; attention_mask:
    [batch, seq] (1 at real tokens). Returns [batch, dim]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class HiddenStateEmbedder:
    """The mean-pooled last hidden states (after the final norm) of ``model``'s base network, for texts batched
    ``batch_size`` at a time, right-padded so that padding never shifts a text's positions."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 16, max_length: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        base = getattr(self.model, "base_model", self.model)
        device = next(self.model.parameters()).device
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_length,
                )
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                hidden = base(**enc).last_hidden_state
                rows.append(mean_pool(hidden.float(), enc["attention_mask"]).cpu().numpy())
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32)


def model_embedder(lm: Any, batch_size: int = 16) -> HiddenStateEmbedder:
    """The causal LM's own embedder (``lm``: a loaded s3lora_cli.lm.CausalLM)."""
    return HiddenStateEmbedder(lm.model, lm.tokenizer, name=f"model:{lm.source}", batch_size=batch_size)


def load_encoder_embedder(directory: Path, device: Any = "cpu", batch_size: int = 16) -> HiddenStateEmbedder:
    """An encoder read with transformers' AutoModel from a local directory (a sentence-transformers model
    directory holds one at its top level), mean-pooled as sentence-transformers pools by default."""
    from s3lora_cli.lm import _require_transformers

    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise AdapterInputError(f"{directory}: not an embedding model (expected a directory with config.json)")
    transformers = _require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = transformers.AutoModel.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterInputError(f"{directory}: cannot be loaded as an embedding model: {exc}") from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HiddenStateEmbedder(model, tokenizer, name=f"embedder:{directory}", batch_size=batch_size)
