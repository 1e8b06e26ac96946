"""What an adapter argument may name: a Hugging Face Hub id in the local cache (with --revision), a file of the
adapter standing for its directory, and the messages for a Hub id not cached and for a full model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_factory import write_adapter
from safetensors.torch import save_file
from typer.testing import CliRunner

from s3lora_cli.adapters.detect import hub_cache_dir, resolve_adapter_path
from s3lora_cli.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, app
from s3lora_cli.errors import AdapterInputError, UsageError

runner = CliRunner()
MAIN = "a" * 40
OLD = "b" * 40


def hub_cache(root: Path) -> Path:
    """A cache as huggingface_hub lays it out: blobs, two snapshots whose files link into blobs, refs/main and a
    tag; returns the cache directory."""
    repo = root / "hub" / "models--someuser--some-lora"
    source = write_adapter(root / "source")
    (repo / "blobs").mkdir(parents=True)
    for commit in (MAIN, OLD):
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            blob = repo / "blobs" / f"{commit[:4]}-{name}"
            blob.write_bytes((source / name).read_bytes())
            (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD + "\n")
    return root / "hub"


def test_cache_directory_follows_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_hub_id_resolves_from_the_cache_at_a_revision(monkeypatch, tmp_path):
    cache = hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    snapshots = cache / "models--someuser--some-lora" / "snapshots"
    assert resolve_adapter_path("someuser/some-lora") == snapshots / MAIN
    assert resolve_adapter_path("someuser/some-lora", "main") == snapshots / MAIN
    assert resolve_adapter_path("someuser/some-lora", "v1") == snapshots / OLD  # a tag, by refs/
    assert resolve_adapter_path("someuser/some-lora", OLD) == snapshots / OLD  # a commit
    result = runner.invoke(app, ["score", "someuser/some-lora", "--revision", "v1", "-f", "json", "-q"])
    assert result.exit_code == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["adapter"]["path"] == str(snapshots / OLD)


def test_check_takes_hub_ids_for_the_adapter_and_the_baseline(monkeypatch, tmp_path):
    cache = hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["check", "someuser/some-lora", "--baseline", "someuser/some-lora", "--max-increase", "0", "-f", "json", "-q"],
    )
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    snapshot = str(cache / "models--someuser--some-lora" / "snapshots" / MAIN)
    assert doc["adapter"]["path"] == snapshot and doc["gate"]["baseline"]["path"] == snapshot


def test_hub_id_not_cached_says_how_to_download_it(monkeypatch, tmp_path):
    cache = hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["score", "otheruser/other-lora"])
    assert result.exit_code == EXIT_INPUT and len(result.stderr.splitlines()) == 1
    assert (
        f"error: otheruser/other-lora: not a local path, and the Hugging Face Hub id is not in the cache {cache}; "
        "download it first (huggingface-cli download otheruser/other-lora), or pass its local directory"
    ) in result.stderr
    result = runner.invoke(app, ["score", "someuser/some-lora", "--revision", "v2"])
    assert result.exit_code == EXIT_INPUT
    assert f"revision v2 is not in the cache {cache} (cached snapshots: {MAIN}, {OLD})" in result.stderr
    assert "huggingface-cli download someuser/some-lora --revision v2" in result.stderr


def test_revision_is_for_hub_ids_only(tmp_path):
    adapter = write_adapter(tmp_path / "local")
    with pytest.raises(UsageError, match="--revision applies to a Hugging Face Hub id"):
        resolve_adapter_path(adapter, "main")
    result = runner.invoke(app, ["prune", str(adapter), "--revision", "main"])
    assert result.exit_code == EXIT_USAGE and "--revision applies" in result.stderr


def test_a_file_of_the_adapter_stands_for_its_directory(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / "README.md").write_text("# card\n")
    for name in ("adapter_config.json", "README.md"):
        assert resolve_adapter_path(adapter / name) == adapter
    assert resolve_adapter_path(adapter / "adapter_model.safetensors") == adapter / "adapter_model.safetensors"
    result = runner.invoke(app, ["score", str(adapter / "adapter_config.json"), "-f", "json", "-q"])
    assert result.exit_code == EXIT_OK and json.loads(result.stdout)["adapter"]["path"] == str(adapter)
    lone = tmp_path / "notes.txt"  # a file beside no adapter stays what it is (and is then refused as such)
    lone.write_text("x")
    assert resolve_adapter_path(lone) == lone
    with pytest.raises(AdapterInputError, match="no such file or directory"):
        resolve_adapter_path(tmp_path / "missing" / "adapter")


def test_a_full_model_is_named_as_such(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(
        {"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.ones(4, 2)},
        str(model / "model.safetensors"),
    )
    for target in (model, model / "model.safetensors"):
        result = runner.invoke(app, ["score", str(target)])
        assert result.exit_code == EXIT_INPUT and len(result.stderr.splitlines()) == 1
        assert "this is a full model, not a LoRA adapter" in result.stderr, result.stderr
