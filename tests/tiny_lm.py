"""A tiny random-initialised causal LM saved as a Hugging Face directory, with a real (word-level) tokenizer
built offline from a few texts and a chat template: what ``s3lora_cli.lm.load_causal_lm`` reads, for the tests
of the commands that run a model. Nothing is downloaded.

    directory = save_tiny_causal_lm(tmp_path / "model", texts=["the capital of France is Paris"])
    lm = load_causal_lm(directory)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(texts: Iterable[str]):
    """A word-level PreTrainedTokenizerFast over the words of ``texts`` (lower-cased, split on whitespace and
    punctuation), with <pad>, <unk>, <s>, </s> and a plain chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    words = list(texts) + ["user", "assistant", ":", "\n"]
    tokenizer.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_causal_lm(
    directory: Path, texts: Iterable[str] = ("a b c",), *, layers: int = 1, hidden: int = 16, seed: int = 0
) -> Path:
    """Write a tiny LlamaForCausalLM (random weights from ``seed``) and its tokenizer into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
