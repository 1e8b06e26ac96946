"""Every adapter format s3lora reads (PEFT in all its forms, kohya-ss / LyCORIS, diffusers, MLX-LM): detection, the
documented scaling of each, the same update giving the same SSI in every format, and prune writing back in the
input's format (diffusers' own loader loads the result)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_factory import write_adapter
from format_factory import hf_cache, kohya_conv_file, kohya_name, small_peft, to_diffusers, to_kohya, to_mlx
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from s3lora_cli.adapters import LayerKind, detect_format, find_adapters, open_adapter
from s3lora_cli.adapters.base import scaled
from s3lora_cli.adapters.peft import block_diagonal
from s3lora_cli.adapters.safetensors_io import SafetensorsSource
from s3lora_cli.cli import app
from s3lora_cli.errors import AdapterInputError, UsageError
from s3lora_cli.pruning import PruneMode, prune_adapter
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.selection import Selection

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        info = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
        return info, dict(fh.metadata() or {})


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """One PEFT adapter and the same update in each other format: {name: (path, module name of PEFT's module)}."""
    root = tmp_path_factory.mktemp("formats")
    peft = write_adapter(root / "peft")
    same = lambda m: m  # noqa: E731
    return {
        "peft": (peft, same),
        "peft-file": (peft / "adapter_model.safetensors", same),
        "kohya": (to_kohya(peft, root / "kohya" / "style.safetensors"), kohya_name),
        "diffusers-alpha": (
            to_diffusers(peft, root / "diff-alpha" / "pytorch_lora_weights.safetensors").parent,
            lambda m: f"unet.{m}",
        ),
        "diffusers-old": (
            to_diffusers(peft, root / "diff-old" / "old.safetensors", layout="old"),
            lambda m: f"unet.{m}",
        ),
        "diffusers-metadata": (
            to_diffusers(peft, root / "diff-meta" / "lora.safetensors", scale_with="metadata", component="transformer"),
            lambda m: f"transformer.{m}",
        ),
        "mlx": (to_mlx(peft, root / "mlx"), same),
        "hf-cache": (hf_cache(peft, root / "hub").parent.parent, same),
    }


EXPECTED_FORMAT = {
    "peft": "peft-safetensors",
    "peft-file": "peft-safetensors",
    "kohya": "kohya",
    "diffusers-alpha": "diffusers",
    "diffusers-old": "diffusers",
    "diffusers-metadata": "diffusers",
    "mlx": "mlx",
    "hf-cache": "peft-safetensors",
}


def test_the_same_update_scores_the_same_in_every_format(formats):
    reference = score_adapter(formats["peft"][0], ScoreOptions(device="cpu"))
    by_module = {s.module: s for s in reference.layers}
    for name, (path, rename) in formats.items():
        result = invoke("score", path, "--format", "json", "--quiet", "--device", "cpu")
        assert result.exit_code == 0, (name, result.output)
        doc = json.loads(result.stdout)
        assert doc["adapter"]["format"] == EXPECTED_FORMAT[name], name
        layers = {layer["module"]: layer for layer in doc["layers"]}
        assert set(layers) == {rename(m) for m in by_module}, name
        for module, expected in by_module.items():
            got = layers[rename(module)]
            assert math.isclose(got["ssi"], expected.ssi, rel_tol=1e-6), (name, module)
            assert got["shape"] == list(expected.layer.shape) and got["r"] == expected.layer.r, (name, module)


def test_each_format_is_detected_and_named(formats):
    for name, (path, _) in formats.items():
        with open_adapter(path) as adapter:
            assert adapter.format == EXPECTED_FORMAT[name], name
            assert {layer.scaling for layer in adapter.layers} == {2.0}, name  # lora_alpha 8 / r 4 everywhere
    assert find_adapters(formats["peft"][0].parent) == sorted(
        [
            formats["peft"][0],
            formats["kohya"][0],
            formats["diffusers-alpha"][0],
            formats["diffusers-old"][0],
            formats["diffusers-metadata"][0],
            formats["mlx"][0],
            formats["hf-cache"][0] / "snapshots" / "0123456789abcdef0123456789abcdef01234567",
        ]
    )


def test_kohya_conv_alpha_and_lycoris(tmp_path):
    with open_adapter(kohya_conv_file(tmp_path / "locon.safetensors", alpha=2.0)) as adapter:
        layers = {layer.module: layer for layer in adapter.layers}
        conv = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
        assert (conv.kind, conv.shape, conv.r, conv.scaling) == (LayerKind.CONV, (8, 8 * 9), 4, 0.5)
        te = layers["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
        assert (te.lora_alpha, te.scaling) == (4.0, 1.0)  # no .alpha: alpha = r
        assert any("alpha = r" in note for note in te.notes)
        reasons = {s.key: s.reason for s in adapter.skipped}
        assert reasons["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"].startswith("LoHa")
        assert reasons["lora_unet_mid_block_attentions_0_proj_out.lokr_w1"].startswith("LoKr")
        left, right = (torch.from_numpy(x) for x in adapter.load_factors(conv, "float64"))
    tensors = load_file(str(tmp_path / "locon.safetensors"))
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].double()
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].double()
    assert torch.allclose(left @ right, 0.5 * up.flatten(1) @ down.flatten(1))


def test_kohya_with_only_lycoris_modules_is_refused(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.ones(4, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 4)}, str(path))
    result = invoke("score", path)
    assert result.exit_code == 3 and "no LoRA (lora_down / lora_up) module" in result.output and "LoHa" in result.output


def test_mlx_dora_embedding_and_config_errors(tmp_path):
    peft = small_peft(tmp_path / "peft")
    mlx = to_mlx(peft, tmp_path / "mlx")
    save_file(
        {
            **load_file(str(mlx / "adapters.safetensors")),
            "model.layers.0.self_attn.q_proj.m": torch.ones(16),
            "model.embed_tokens.lora_a": torch.randn(32, 4),
            "model.embed_tokens.lora_b": torch.randn(4, 16),
        },
        str(mlx / "adapters.safetensors"),
    )
    with open_adapter(mlx) as adapter:
        layers = {layer.module: layer for layer in adapter.layers}
        assert any("DoRA" in n for n in layers["model.layers.0.self_attn.q_proj"].notes)
        emb = layers["model.embed_tokens"]
        assert (emb.kind, emb.shape) == (LayerKind.EMBEDDING, (32, 16))
    config = json.loads((mlx / "adapter_config.json").read_text())
    for change, message in (
        ({"fine_tune_type": "full"}, "fine_tune_type is 'full'"),
        ({"lora_parameters": {"rank": 4}}, "lora_parameters.scale must be a number"),
        ({"lora_parameters": {"rank": 8, "scale": 1.0}}, "lora_parameters.rank=8"),
    ):
        (mlx / "adapter_config.json").write_text(json.dumps({**config, **change}))
        result = invoke("score", mlx)
        assert result.exit_code == 3 and message in result.output, result.output
    (mlx / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "lora_parameters"}))
    result = invoke("score", mlx, "--input-format", "mlx")
    assert result.exit_code == 3 and "'lora_parameters'" in result.output


def test_diffusers_scaling_rules(tmp_path):
    peft = small_peft(tmp_path / "peft", r=4, lora_alpha=8)
    no_alpha = to_diffusers(peft, tmp_path / "a" / "pytorch_lora_weights.safetensors", scale_with="none")
    with open_adapter(no_alpha) as adapter:  # no alpha anywhere: lora_alpha = r, as diffusers builds the config
        assert {layer.scaling for layer in adapter.layers} == {1.0}
    meta = to_diffusers(peft, tmp_path / "b" / "lora.safetensors", scale_with="metadata")
    with open_adapter(meta) as adapter:
        assert {layer.scaling for layer in adapter.layers} == {2.0}


def test_detection_errors_name_what_was_found_and_the_option(tmp_path):
    unknown = tmp_path / "u.safetensors"
    save_file({"model.scale": torch.ones(2, 2)}, str(unknown))
    result = invoke("score", unknown)
    assert result.exit_code == 3 and "no LoRA tensor names" in result.output and "--input-format" in result.output
    full = tmp_path / "model.safetensors"  # a full model's weights: says so, and still names the option
    save_file({"model.embed_tokens.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(2, 2)}, str(full))
    result = invoke("score", full)
    assert result.exit_code == 3 and "this is a full model, not a LoRA adapter" in result.stderr
    assert "--input-format" in result.stderr and len(result.stderr.splitlines()) == 1
    mixed = tmp_path / "m.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "unet.b.lora_A.weight": torch.ones(2, 4)}, str(mixed))
    result = invoke("score", mixed)
    assert result.exit_code == 3 and "ambiguous" in result.output and "diffusers and kohya" in result.output
    assert "--input-format" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("score", empty)
    assert result.exit_code == 3 and "cannot tell which adapter" in result.output
    peft = small_peft(tmp_path / "peft")
    result = invoke("score", peft, "--input-format", "mlx")
    assert result.exit_code == 3 and "looks like a peft adapter" in result.output
    result = invoke("score", peft, "--input-format", "lora")
    assert result.exit_code == 2


def test_peft_forms_multiple_adapters_bin_and_file(tmp_path):
    root = small_peft(tmp_path / "multi")
    small_peft(root / "second", lora_alpha=4)
    small_peft(root / "third", lora_alpha=16)
    default = score_adapter(root)
    assert {s.layer.scaling for s in default.layers} == {2.0}
    second = score_adapter(root, ScoreOptions(adapter_name="second"))
    assert {s.layer.scaling for s in second.layers} == {1.0}
    assert second.adapter.weights_file == str(root / "second" / "adapter_model.safetensors")
    result = invoke("score", root, "--adapter", "missing")
    assert result.exit_code == 3 and "default, second, third" in result.output
    # no adapter of its own and several named ones: the error lists them and says how to pick one
    (root / "adapter_model.safetensors").unlink()
    result = invoke("score", root)
    assert result.exit_code == 3 and "second, third" in result.output and "--adapter NAME" in result.output
    result = invoke("score", root, "--adapter", "third", "--format", "json", "-q")
    assert result.exit_code == 0 and json.loads(result.stdout)["adapter"]["lora_alpha"] == 16
    # adapter_model.bin and the weights file itself
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(root / "third" / "adapter_config.json", bin_dir)
    torch.save(load_file(str(root / "third" / "adapter_model.safetensors")), bin_dir / "adapter_model.bin")
    bin_report = score_adapter(bin_dir / "adapter_model.bin")
    assert bin_report.adapter.format == "peft-bin"
    assert [s.ssi for s in bin_report.layers] == [s.ssi for s in score_adapter(root / "third").layers]
    with pytest.raises(UsageError, match="not a weights file"):
        open_adapter(bin_dir / "adapter_model.bin", adapter_name="x")
    with pytest.raises(UsageError, match="only PEFT"):
        open_adapter(to_mlx(root / "third", tmp_path / "mlx"), adapter_name="x")


def test_hf_cache_snapshot_and_repository_folder(tmp_path):
    peft = small_peft(tmp_path / "peft")
    snapshot = hf_cache(peft, tmp_path / "hub")
    repo = snapshot.parent.parent
    assert detect_format(repo) == "peft"
    ssi = [s.ssi for s in score_adapter(peft).layers]
    assert [s.ssi for s in score_adapter(snapshot).layers] == ssi == [s.ssi for s in score_adapter(repo).layers]
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / "other").mkdir()
    with pytest.raises(AdapterInputError, match="2 snapshots"):
        score_adapter(repo)
    result = invoke("prune", snapshot, "--tau", "1", "-q")  # never into the cache by default
    assert result.exit_code == 2 and "Hugging Face cache" in result.output
    result = invoke("prune", snapshot, "--tau", "1", "-q", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def _pruned_roundtrip(source: Path, output: Path, mode: str) -> dict:
    result = invoke("prune", source, "--tau", "1", "--mode", mode, "-o", output, "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_prune_kohya_writes_kohya(tmp_path):
    peft = small_peft(tmp_path / "peft")
    source = to_kohya(peft, tmp_path / "loras" / "style.safetensors")
    before, meta = header(source)
    doc = _pruned_roundtrip(source, tmp_path / "loras" / "zero.safetensors", "zero")
    assert doc["adapter"]["format"] == "kohya"
    module = doc["pruned"][0]["module"]
    assert module == kohya_name("model.layers.1.self_attn.v_proj")
    after, new_meta = header(tmp_path / "loras" / "zero.safetensors")
    assert after == before  # same key set, shapes, dtypes
    assert new_meta["ss_network_dim"] == meta["ss_network_dim"] and "s3lora.pruned" in new_meta
    tensors, original = load_file(str(tmp_path / "loras" / "zero.safetensors")), load_file(str(source))
    assert not tensors[f"{module}.lora_up.weight"].any()
    assert all(torch.equal(tensors[k], original[k]) for k in original if k != f"{module}.lora_up.weight")
    _pruned_roundtrip(source, tmp_path / "loras" / "drop.safetensors", "drop")
    dropped, _ = header(tmp_path / "loras" / "drop.safetensors")
    assert set(dropped) == set(before) - {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"}
    with open_adapter(tmp_path / "loras" / "drop.safetensors") as adapter:  # and s3lora reads it back
        assert adapter.format == "kohya" and len(adapter.layers) == 3
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == [
        "drop.safetensors",
        "style.safetensors",
        "zero.safetensors",
    ]


def test_prune_mlx_writes_mlx_and_refuses_drop(tmp_path):
    peft = small_peft(tmp_path / "peft")
    source = to_mlx(peft, tmp_path / "mlx")
    (source / "0000100_adapters.safetensors").write_bytes((source / "adapters.safetensors").read_bytes())
    before, meta = header(source / "adapters.safetensors")
    doc = _pruned_roundtrip(source, tmp_path / "out", "zero")
    module = doc["pruned"][0]["module"]
    assert doc["adapter"]["format"] == "mlx" and module == "model.layers.1.self_attn.v_proj"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
        "s3lora-report.json",
    ]
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == (source / "adapter_config.json").read_bytes()
    after, new_meta = header(tmp_path / "out" / "adapters.safetensors")
    assert after == before and new_meta["format"] == "mlx"
    assert not load_file(str(tmp_path / "out" / "adapters.safetensors"))[f"{module}.lora_b"].any()
    result = invoke("prune", source, "--tau", "1", "--mode", "drop", "-o", tmp_path / "out2")
    assert result.exit_code == 2 and "cannot drop layers" in result.output and "--mode zero" in result.output
    assert not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """A LoRA trained-looking on a tiny random UNet2DConditionModel (no download), saved by diffusers'
    save_lora_weights (PEFT-style keys, lora_adapter_metadata in the header)."""
    diffusers = pytest.importorskip("diffusers")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def tiny_unet():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
            norm_num_groups=4,
        )

    unet = tiny_unet()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    path = tmp_path_factory.mktemp("diffusers") / "lora"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict()
    )
    return path, tiny_unet


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_prune_diffusers_loads_with_diffusers(diffusers_lora, tmp_path, mode):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    source, tiny_unet = diffusers_lora
    result = invoke("prune", source, "--tau", "2", "--mode", mode, "-o", tmp_path / "out", "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["adapter"]["format"] == "diffusers" and len(doc["layers"]) == 32
    pruned = [p["module"].removeprefix("unet.") for p in doc["pruned"]]
    unet = tiny_unet()
    unet.load_lora_adapter(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    wrapped = {name: m for name, m in unet.named_modules() if isinstance(m, PeftLoraLayer)}
    original = load_file(str(source / "pytorch_lora_weights.safetensors"))
    if mode == "drop":
        assert len(wrapped) == 30 and not set(pruned) & set(wrapped)
    else:
        assert len(wrapped) == 32
        for name in pruned:
            assert not wrapped[name].lora_B["default_0"].weight.any()
    for name, layer in wrapped.items():
        assert layer.scaling["default_0"] == 2.0
        if name not in pruned:
            assert torch.equal(layer.lora_B["default_0"].weight, original[f"unet.{name}.lora_B.weight"])


def test_check_and_dry_run_take_the_input_options(tmp_path):
    peft = small_peft(tmp_path / "multi")
    small_peft(peft / "second")
    kohya = to_kohya(peft, tmp_path / "style.safetensors")
    result = invoke("check", kohya, "--input-format", "kohya", "--max-ssi", "0.999", "--format", "json", "-q")
    assert result.exit_code == 0 and json.loads(result.stdout)["adapter"]["format"] == "kohya"
    result = invoke("check", peft, "--adapter", "second", "--max-ssi", "0.5", "-q", "--format", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["adapter"]["weights_file"].endswith("second/adapter_model.safetensors")
    result = invoke("prune", kohya, "--dry-run", "--tau", "1", "-q")
    assert result.exit_code == 0 and str(tmp_path / "style-pruned.safetensors") in result.output.replace("\n", "")
    assert not (tmp_path / "style-pruned.safetensors").exists()
    with pytest.raises(UsageError, match="cannot drop"):
        prune_adapter(to_mlx(peft, tmp_path / "mlx"), tmp_path / "o", Selection.of(1), PruneMode.DROP, dry_run=True)


def test_diffusers_attention_processor_names_and_single_file_prune(tmp_path):
    gen = torch.Generator().manual_seed(3)
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    tensors = {
        f"{stem}.to_out_lora.down.weight": torch.randn(2, 8, generator=gen),
        f"{stem}.to_out_lora.up.weight": torch.randn(8, 2, generator=gen),
        f"{stem}.to_q_lora.down.weight": torch.randn(2, 8, generator=gen),
        f"{stem}.to_q_lora.up.weight": torch.randn(8, 2, generator=gen),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.randn(
            2, 8, generator=gen
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.randn(
            8, 2, generator=gen
        ),
    }
    source = tmp_path / "old.safetensors"
    save_file(tensors, str(source), metadata={"note": "kept"})
    with open_adapter(source) as adapter:
        assert [layer.module for layer in adapter.layers] == [
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ]
    doc = _pruned_roundtrip(source, tmp_path / "pruned.safetensors", "zero")
    after, metadata = header(tmp_path / "pruned.safetensors")
    assert after == header(source)[0] and metadata["note"] == "kept" and "s3lora.pruned" in metadata
    assert doc["prune"]["output"] == str(tmp_path / "pruned.safetensors")


def test_prune_kohya_loads_with_diffusers_kohya_converter(diffusers_lora, tmp_path):
    """The tiny UNet's LoRA renamed as kohya-ss names it, pruned by s3lora, read back by diffusers' own kohya
    converter: the dropped modules stay unwrapped, the others keep alpha / r."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    source, tiny_unet = diffusers_lora
    tensors = {}
    for key, value in load_file(str(source / "pytorch_lora_weights.safetensors")).items():
        module, _, role = key.removeprefix("unet.").rpartition(".lora_")
        name = kohya_name(module)
        tensors[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(tmp_path / "style.safetensors"))
    doc = _pruned_roundtrip(tmp_path / "style.safetensors", tmp_path / "pruned.safetensors", "drop")
    assert {layer["module"] for layer in doc["layers"]} == {k.partition(".")[0] for k in tensors}
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path), weight_name="pruned.safetensors")
    unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet)
    wrapped = {kohya_name(name): m for name, m in unet.named_modules() if isinstance(m, PeftLoraLayer)}
    assert len(wrapped) == 31 and not {p["module"] for p in doc["pruned"]} & set(wrapped)  # 32 - tau 1
    assert {m.scaling["default_0"] for m in wrapped.values()} == {2.0}  # alpha 4 / r 2, as s3lora scales it


# --- factors read without PyTorch: the same values as PyTorch's conversion, bit for bit ---------------------------

_RAW = {"F64": ("<u8", 64), "F32": ("<u4", 32), "F16": ("<u2", 16), "BF16": ("<u2", 16)}
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _special_bits(name: str) -> list[int]:
    """Zeros, infinities, NaNs, the smallest and largest subnormals and normals, and (for F64) values beyond
    float32's range and halfway between two float32 values, by their bit patterns."""
    width = _RAW[name][1]
    exponent_bits = {64: 11, 32: 8, 16: 5 if name == "F16" else 8}[width]
    mantissa = width - 1 - exponent_bits
    sign, inf = 1 << (width - 1), ((1 << exponent_bits) - 1) << mantissa
    patterns = [0, sign, inf, sign | inf, inf | 1, inf | (1 << (mantissa - 1)), 1, (1 << mantissa) - 1]
    patterns += [1 << mantissa, inf - 1, sign | (inf - 1)]
    if name == "F64":
        patterns += [
            struct.unpack("<Q", struct.pack("<d", x))[0]
            for x in (3.5e38, -1e39, 1e-46, 1.0 + 2.0**-24, 1.0 + 3 * 2.0**-25, 2.0**-149 * 1.5)
        ]
    return patterns


@settings(max_examples=examples(60), deadline=None)
@given(st.sampled_from(sorted(_RAW)), st.sampled_from(["float32", "float64"]), st.data())
def test_factors_read_without_pytorch_equal_its_conversion(tmp_path_factory, name, dtype, data):
    """``get_float`` reads F64, F32, F16 and BF16 with NumPy alone; every value, special ones included, is the one
    PyTorch's ``tensor.to(dtype)`` gives (NaNs compared as NaNs)."""
    raw_dtype, width = _RAW[name]
    bits = data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=24)) + _special_bits(name)
    raw = np.array(bits, dtype=raw_dtype).tobytes()
    head = json.dumps({"x": {"dtype": name, "shape": [len(bits)], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path_factory.mktemp("raw") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw)
    source = SafetensorsSource(path)
    ours = source.get_float("x", dtype)
    theirs = source.get("x").to(getattr(torch, dtype)).numpy()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    same = np.isnan(ours) | (ours.view(f"u{ours.itemsize}") == theirs.view(f"u{theirs.itemsize}"))
    assert same.all(), f"differ at {np.flatnonzero(~same)[:5]}: {ours[~same][:5]} against {theirs[~same][:5]}"


@settings(max_examples=examples(60), deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    st.sampled_from(["float32", "float64"]),
)
def test_scaled_factor_equals_pytorchs_product(seed, scaling, dtype):
    """A factor times its layer's scaling, in the factor's dtype, as PyTorch's ``scaling * tensor`` rounds it (the
    scaling rounded to the dtype first, then one rounded product), on values of every magnitude."""
    rng = np.random.default_rng(seed)
    factor = (rng.standard_normal(256) * 10.0 ** rng.uniform(-8, 8, 256)).astype(dtype)
    ours = scaled(factor, scaling)
    theirs = (scaling * torch.from_numpy(factor.copy())).numpy()
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_grouped_lora_b_is_block_diagonal_as_torch_makes_it():
    """PEFT's grouped convolution: lora_B split into G row blocks (``torch.chunk``) along the diagonal."""
    b = np.arange(24, dtype=np.float64).reshape(6, 4)
    for groups in (1, 2, 3, 6):
        size = -(-b.shape[0] // groups)
        ours = block_diagonal([b[i : i + size] for i in range(0, b.shape[0], size)])
        theirs = torch.block_diag(*torch.from_numpy(b).chunk(groups, dim=0)).numpy()
        assert np.array_equal(ours, theirs)
