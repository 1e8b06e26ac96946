"""Loading a local causal LM (s3lora_cli.lm): a Hugging Face directory, the messages for what is not a model."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_lm import save_tiny_causal_lm  # noqa: E402

from s3lora_cli.errors import AdapterInputError  # noqa: E402
from s3lora_cli.lm import load_causal_lm  # noqa: E402


def test_loads_a_model_directory_with_its_tokenizer(tmp_path):
    directory = save_tiny_causal_lm(tmp_path / "model", texts=["the capital of france is paris"])
    lm = load_causal_lm(directory)
    ids = lm.tokenizer("the capital of france", return_tensors="pt")["input_ids"]
    assert lm.tokenizer.decode(ids[0]) == "the capital of france"
    assert lm.model.config.vocab_size == len(lm.tokenizer)
    assert lm.directory == directory and not lm.model.training
    generated = lm.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_a_missing_path_is_an_input_problem(tmp_path):
    with pytest.raises(AdapterInputError, match="no such model"):
        load_causal_lm(tmp_path / "absent")


def test_a_directory_without_a_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(AdapterInputError, match="not a model"):
        load_causal_lm(tmp_path)
