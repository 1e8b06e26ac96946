"""Hostile paths: symlinks out of the adapter directory (refused, except a Hugging Face cache snapshot's links into
its own blobs/), --adapter names that try to leave the directory, outputs inside the input; nothing is written
on any failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from format_factory import hf_cache, small_peft, to_diffusers, to_kohya, to_mlx
from typer.testing import CliRunner

from s3lora_cli.cli import app
from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import ScoreOptions

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A PEFT adapter outside the directories the tests point s3lora at."""
    return small_peft(tmp_path / "elsewhere")


def _link(link: Path, target: Path) -> Path:
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json"])
def test_peft_file_symlinked_outside_is_refused(tmp_path, outside, which):
    adapter = small_peft(tmp_path / "adapter")
    _link(adapter / which, outside / which)
    result = invoke("score", adapter)
    assert result.exit_code == 3 and "symlink leading outside the adapter directory" in result.output
    assert "Traceback" not in result.output


def test_symlink_inside_the_directory_is_allowed(tmp_path):
    adapter = small_peft(tmp_path / "adapter")
    (adapter / "real").mkdir()
    os.replace(adapter / "adapter_model.safetensors", adapter / "real" / "weights.safetensors")
    _link(adapter / "adapter_model.safetensors", Path("real", "weights.safetensors"))
    assert invoke("score", adapter, "-q").exit_code == 0


def test_other_formats_symlinked_outside_are_refused(tmp_path, outside):
    kohya = to_kohya(outside, tmp_path / "elsewhere-kohya" / "real.safetensors")
    (tmp_path / "loras").mkdir()
    link = _link(tmp_path / "loras" / "style.safetensors", kohya)
    mlx = to_mlx(small_peft(tmp_path / "p2"), tmp_path / "mlx")
    _link(mlx / "adapters.safetensors", to_mlx(outside, tmp_path / "mlx-elsewhere") / "adapters.safetensors")
    diffusers = to_diffusers(outside, tmp_path / "diff" / "pytorch_lora_weights.safetensors").parent
    _link(
        diffusers / "pytorch_lora_weights.safetensors",
        to_diffusers(outside, tmp_path / "diff-elsewhere" / "pytorch_lora_weights.safetensors"),
    )
    for path in (link, mlx, diffusers):
        result = invoke("score", path)
        assert result.exit_code == 3 and "symlink leading outside" in result.output, (path, result.output)


def test_hf_cache_links_only_into_the_same_repository_blobs(tmp_path, outside):
    snapshot = hf_cache(outside, tmp_path / "hub")
    assert invoke("score", snapshot, "-q").exit_code == 0
    other = hf_cache(outside, tmp_path / "hub", repo="models--org--other")
    blob = os.readlink(other / "adapter_model.safetensors")
    _link(
        snapshot / "adapter_model.safetensors",
        Path("..", "..", "..", "models--org--other", "snapshots", other.name, blob),
    )
    result = invoke("score", snapshot)
    assert result.exit_code == 3 and "symlink leading outside" in result.output


def test_named_adapter_directory_symlinked_outside_is_refused(tmp_path, outside):
    root = small_peft(tmp_path / "multi")
    _link(root / "other", outside)
    result = invoke("score", root, "--adapter", "other")
    assert result.exit_code == 3 and "symlink leading outside" in result.output


@pytest.mark.parametrize("name", ["../elsewhere", "..", ".", "/tmp/x", "a/b", "a\\b", ".hidden", ""])
def test_adapter_names_with_traversal_are_refused(tmp_path, outside, name):
    root = small_peft(tmp_path / "multi")
    for command in (["score", root], ["prune", root, "--dry-run"], ["check", root, "--max-ssi", "0.9"]):
        result = invoke(*command, "--adapter", name)
        assert result.exit_code == 2 and "--adapter" in result.output, (command, result.output)
    with pytest.raises(UsageError):
        ScoreOptions(adapter_name=name)


def test_outputs_inside_the_input_are_refused_and_nothing_is_written(tmp_path):
    peft = small_peft(tmp_path / "peft")
    mlx = to_mlx(peft, tmp_path / "mlx")
    diffusers = to_diffusers(peft, tmp_path / "diff" / "pytorch_lora_weights.safetensors").parent
    kohya = to_kohya(peft, tmp_path / "loras" / "style.safetensors")
    small_peft(peft / "named")
    _link(tmp_path / "loras" / "alias.safetensors", Path("style.safetensors"))
    before = tree(tmp_path)
    cases = [
        (mlx, mlx / "pruned"),
        (diffusers, diffusers / "sub" / "pruned"),
        (diffusers / "pytorch_lora_weights.safetensors", diffusers / "pytorch_lora_weights.safetensors"),
        (kohya, kohya),
        (kohya, tmp_path / "loras" / "alias.safetensors"),  # the input, through a symlink
        (kohya, tmp_path / "loras"),  # a directory, where a file is expected
    ]
    for source, output in cases:
        result = invoke("prune", source, "--tau", "1", "-o", output, "--force")
        assert result.exit_code == 2, (source, output, result.output)
    result = invoke("prune", peft, "--adapter", "named", "--tau", "1", "-o", peft / "named" / "x")
    assert result.exit_code == 2 and "inside it" in result.output
    assert tree(tmp_path) == before


def test_other_files_symlinked_outside_are_not_copied(tmp_path, outside):
    adapter = small_peft(tmp_path / "adapter")
    _link(adapter / "README.md", outside / "adapter_config.json")
    result = invoke("prune", adapter, "--tau", "1", "-o", tmp_path / "out")
    assert result.exit_code == 3 and "README.md is a symlink leading outside" in result.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
