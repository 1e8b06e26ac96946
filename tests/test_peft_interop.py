"""The adapter reader against the real PEFT library: adapters that peft's save_pretrained writes for tiny
random-initialised models open with the module names, ranks, scalings and dW that PEFT itself computes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from profiles import examples
from safetensors.torch import load_file, save_file
from tiny_models import (
    add_lora,
    delta_shape,
    lora_modules,
    peft_delta,
    peft_delta_native,
    save_lora,
    save_raw_state_dict,
    tiny_bert,
    tiny_conv_net,
    tiny_gpt2,
    tiny_llama,
    tiny_mixtral,
    tiny_t5,
)
from torch import nn

from s3lora_cli.adapters import LayerKind, open_adapter, pattern_key
from s3lora_cli.errors import AdapterInputError
from s3lora_cli.scoring import score_adapter

pytestmark = pytest.mark.filterwarnings("ignore")  # PEFT warns about grouped convs, lora_bias without bias, ...

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One kind of adapter: how to build the model and LoraConfig, and how to save it."""

    build: Callable[[], nn.Module]
    config: Callable[[], LoraConfig]
    adapter_name: str = "default"
    save: str = "pretrained"  # "pretrained", "bin" (adapter_model.bin) or "raw" (model.state_dict(), names kept)
    save_kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None


CASES = {
    "llama": Case(lambda: tiny_llama(layers=2), lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL)),
    "gpt2-conv1d": Case(
        tiny_gpt2,
        lambda: LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
    "t5": Case(tiny_t5, lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["q", "v"])),
    "bert": Case(tiny_bert, lambda: LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"])),
    "embedding": Case(tiny_llama, lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "conv": Case(
        tiny_conv_net,
        lambda: LoraConfig(r=2, lora_alpha=5, target_modules=["conv", "pointwise", "grouped", "conv1d", "head"]),
    ),
    "lora-bias": Case(
        tiny_bert, lambda: LoraConfig(r=2, lora_alpha=4, lora_bias=True, target_modules=["query", "value", "dense"])
    ),
    "lora-bias-conv": Case(
        tiny_conv_net, lambda: LoraConfig(r=2, lora_alpha=4, lora_bias=True, target_modules=["conv", "conv1d"])
    ),
    "dora": Case(
        tiny_llama,
        lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    ),
    "dora-conv": Case(
        tiny_conv_net, lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["conv", "conv1d"])
    ),
    "modules-to-save": Case(
        tiny_bert, lambda: LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    ),
    "save-embedding-layers": Case(
        tiny_llama,
        lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
        save_kwargs={"save_embedding_layers": True},
    ),
    "trainable-tokens": Case(
        tiny_llama, lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[1, 3])
    ),
    "rslora": Case(tiny_llama, lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_ALL)),
    "patterns": Case(
        lambda: tiny_llama(layers=2),
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_ALL,
            # first match wins, as in PEFT: layer 0's q_proj gets 3, layer 1's gets 2
            rank_pattern={
                "layers.0.self_attn.q_proj": 3,
                "q_proj": 2,
                r"mlp\.(up|down)_proj": 1,
                "model.layers.1.mlp.gate_proj": 5,
            },
            alpha_pattern={"v_proj": 2, "layers.1.self_attn.k_proj": 7.5, r"layers\.0\.mlp\.\w+_proj": 16},
        ),
    ),
    "patterns-rslora": Case(
        lambda: tiny_llama(layers=2),
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=LLAMA_ALL,
            rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 3},
            alpha_pattern={"o_proj": 3},
        ),
    ),
    "other-name": Case(tiny_t5, lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]), adapter_name="other"),
    "raw-state-dict": Case(
        tiny_llama,
        lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens", "down_proj"]),
        adapter_name="other",
        save="raw",
    ),
    "raw-dora-seq-cls": Case(
        tiny_bert,
        lambda: LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, use_dora=True, target_modules=["query", "value"]),
        adapter_name="other",
        save="raw",
    ),
    "moe-target-parameters": Case(
        tiny_mixtral,
        lambda: LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
        ),
    ),
    "bin": Case(
        tiny_gpt2, lambda: LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn"]), save="bin"
    ),
    "fp16": Case(
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL + ["embed_tokens"]),
        dtype=torch.float16,
    ),
    "bf16": Case(
        tiny_gpt2,
        lambda: LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        dtype=torch.bfloat16,
    ),
    "bf16-conv": Case(
        tiny_conv_net, lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "conv1d"]), dtype=torch.bfloat16
    ),
}


@dataclass
class Saved:
    path: Path
    modules: dict  # PEFT's LoRA layers by module path without base_model.model.
    adapter_name: str
    dtype: torch.dtype | None
    keys: list[str]  # the tensor names in the weights file
    experts: list[str]  # PEFT's target_parameters layers on 3-d (mixture-of-experts) parameters: not analysed


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], Saved]:
    """Build and save each case once per module; the delta test and the scoring test share it."""
    cache: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in cache:
            case = CASES[name]
            seed = sorted(CASES).index(name)
            model = add_lora(case.build(), case.config(), adapter_name=case.adapter_name, seed=seed, dtype=case.dtype)
            root = tmp_path_factory.mktemp(name)
            if case.save == "raw":
                path = save_raw_state_dict(model, root / "raw", adapter_name=case.adapter_name)
            else:
                kwargs = dict(case.save_kwargs, safe_serialization=case.save != "bin")
                path = save_lora(model, None, root / "adapter", adapter_name=case.adapter_name, **kwargs)
            if case.save == "bin":
                keys = list(torch.load(path / "adapter_model.bin", weights_only=True))
            else:
                keys = list(load_file(path / "adapter_model.safetensors"))
            modules = lora_modules(model, case.adapter_name)
            analysed = {n: m for n, m in modules.items() if getattr(m, "num_experts", 1) == 1}
            experts = sorted(set(modules) - set(analysed))
            cache[name] = Saved(path, analysed, case.adapter_name, case.dtype, keys, experts)
        return cache[name]

    return get


def _kind(module) -> LayerKind:
    base = module.get_base_layer()
    if isinstance(base, nn.Embedding):
        return LayerKind.EMBEDDING
    return LayerKind.CONV if isinstance(base, nn.modules.conv._ConvNd) else LayerKind.LINEAR


@pytest.mark.parametrize("name", list(CASES))
def test_reader_matches_peft(saved, name):
    s = saved(name)
    with open_adapter(s.path) as adapter:
        layers = {layer.module: layer for layer in adapter.layers}
        assert sorted(layers) == list(s.modules), "the reader's layers are PEFT's LoRA modules, named by path"
        for module_name, module in s.modules.items():
            layer, adapter_name = layers[module_name], s.adapter_name
            assert layer.kind is _kind(module)
            assert layer.shape == delta_shape(module)
            assert layer.r == module.r[adapter_name]
            assert layer.lora_alpha == module.lora_alpha[adapter_name]
            assert layer.scaling == pytest.approx(module.scaling[adapter_name], rel=1e-15)
            assert layer.dtype == str(s.dtype or torch.float32).removeprefix("torch.")
            left, right = (torch.from_numpy(x) for x in adapter.load_factors(layer, "float64"))
            assert left.dtype == right.dtype == torch.float64
            assert left.shape == (layer.shape[0], layer.r) and right.shape == (layer.r, layer.shape[1])
            expected = peft_delta(module, adapter_name)  # from the same stored values, computed in float64
            torch.testing.assert_close(left @ right, expected, rtol=1e-10, atol=1e-10)
            if s.dtype is not None:  # and against PEFT's own delta in the stored dtype (fp32 math, rounded)
                native = peft_delta_native(module, adapter_name).double()
                tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[s.dtype]
                torch.testing.assert_close(left @ right, native, rtol=tol, atol=tol * native.abs().max().item())
        lora_keys = {key for layer in adapter.layers for key in layer.keys.values()}
        skipped = {item.key for item in adapter.skipped}
        assert lora_keys | skipped == set(s.keys) and not lora_keys & skipped, "every tensor is used or listed"


def test_conv_delta_is_the_lora_path_of_the_forward_pass(saved):
    """Independent of PEFT's get_delta_weight (which has no grouped-conv support): the LoRA branch of each conv
    module's forward equals a convolution with our dW, reshaped to [out, in, *kernel]."""
    s = saved("conv")
    gen = torch.Generator().manual_seed(0)
    with open_adapter(s.path) as adapter, torch.no_grad():
        for layer in adapter.layers:
            module = s.modules[layer.module]
            base = module.get_base_layer()
            if not isinstance(base, nn.modules.conv._ConvNd):
                continue
            x = torch.randn(2, base.in_channels, *([5] * (base.weight.dim() - 2)), generator=gen)
            left, right = (torch.from_numpy(x) for x in adapter.load_factors(layer, "float32"))
            kernel = (left @ right).reshape(base.out_channels, base.in_channels, *base.kernel_size)
            conv = {1: nn.functional.conv1d, 2: nn.functional.conv2d}[base.weight.dim() - 2]
            expected = conv(x, kernel, stride=base.stride, padding=base.padding)
            torch.testing.assert_close(module(x) - base(x), expected, rtol=1e-4, atol=1e-4)
        grouped = next(layer for layer in adapter.layers if layer.module == "grouped")
    assert grouped.groups == 2 and grouped.r == 2 and any("groups=2" in note for note in grouped.notes)


def _layer(name: str, saved, module: str):
    with open_adapter(saved(name).path) as adapter:
        return next(layer for layer in adapter.layers if layer.module == module), adapter.skipped


def test_lora_bias_is_noted_not_scored(saved):
    for name, module in (("lora-bias", "bert.encoder.layer.0.attention.self.query"), ("lora-bias-conv", "conv")):
        layer, _ = _layer(name, saved, module)
        assert layer.keys["B.bias"].endswith(f"{module}.lora_B.bias")
        assert any("lora_B.bias" in note for note in layer.notes)


def test_dora_is_scored_with_a_note(saved):
    for name, module in (
        ("dora", "model.layers.0.self_attn.q_proj"),
        ("dora", "model.embed_tokens"),
        ("dora-conv", "conv1d"),
    ):
        layer, _ = _layer(name, saved, module)
        assert layer.keys["magnitude"].endswith(f"{module}.lora_magnitude_vector")
        assert any("DoRA" in note and "low-rank" in note for note in layer.notes), layer.notes


def test_modules_to_save_and_shipped_weights_are_skipped_with_reasons(saved):
    _, skipped = _layer("modules-to-save", saved, "bert.encoder.layer.0.attention.self.query")
    assert {s.key for s in skipped} == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert all(s.module == "classifier" and "modules_to_save" in s.reason for s in skipped)
    assert next(s for s in skipped if s.key.endswith("weight")).shape == (2, 16)

    _, skipped = _layer("save-embedding-layers", saved, "model.layers.0.self_attn.q_proj")
    assert {s.module for s in skipped} == {"model.embed_tokens", "lm_head"}
    assert all("not a LoRA" in s.reason for s in skipped)

    _, skipped = _layer("embedding", saved, "model.embed_tokens")
    assert [(s.key, s.module) for s in skipped] == [
        ("base_model.model.model.embed_tokens.base_layer.weight", "model.embed_tokens")
    ]
    assert "base weights" in skipped[0].reason

    _, skipped = _layer("trainable-tokens", saved, "model.layers.0.self_attn.q_proj")
    assert [s.module for s in skipped] == ["model.embed_tokens"]
    assert "trainable_token_indices" in skipped[0].reason


def test_mixture_of_experts_parameters_are_skipped_with_a_reason(saved):
    s = saved("moe-target-parameters")
    assert s.experts == ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"]
    _, skipped = _layer("moe-target-parameters", saved, "model.layers.0.self_attn.q_proj")
    assert {item.module for item in skipped} == set(s.experts) and len(skipped) == 4
    for item in skipped:  # PEFT may save target_parameters in any order
        assert item.reason.startswith("target_parameters (") and "2 experts' rank-2" in item.reason
        assert all(name in item.reason for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    # the router is a 2-d target parameter: one dW, analysed like a Linear
    router, _ = _layer("moe-target-parameters", saved, "model.layers.0.mlp.gate")
    assert router.kind is LayerKind.LINEAR and router.shape == (2, 16)


def test_only_expert_parameters_is_a_clear_error(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    path = save_lora(tiny_mixtral(), config, tmp_path / "adapter")
    with pytest.raises(AdapterInputError, match=r"no LoRA layer that s3lora can analyse: target_parameters"):
        open_adapter(path)


def test_adapter_name_kept_in_raw_state_dict(saved):
    s = saved("raw-state-dict")
    assert any(".lora_A.other.weight" in key for key in s.keys)
    with open_adapter(s.path) as adapter:
        assert all(
            layer.keys["A"].split(".")[-2:] in (["other", "weight"], ["lora_embedding_A", "other"])
            for layer in adapter.layers
        )
        assert all(any("adapter name in keys: other" in note for note in layer.notes) for layer in adapter.layers)
        assert {s.reason for s in adapter.skipped if ".base_layer." in s.key} == {
            "full base weights shipped with the adapter (e.g. resized embeddings), not a LoRA update"
        }


def test_raw_state_dict_wrappers_name_their_module(saved):
    """model.state_dict() keeps PEFT's wrappers in the keys; skipped tensors are named by the wrapped module."""
    q = "bert.encoder.layer.0.attention.self.query"
    layer, skipped = _layer("raw-dora-seq-cls", saved, q)
    assert layer.keys["magnitude"] == f"base_model.model.{q}.lora_magnitude_vector.other.weight"
    by_key = {item.key.removeprefix("base_model.model."): item for item in skipped}
    assert by_key[f"{q}.base_layer.weight"].module == q
    assert "base weights" in by_key[f"{q}.base_layer.weight"].reason
    assert by_key["classifier.modules_to_save.other.weight"].module == "classifier"
    assert "full trained copy" in by_key["classifier.modules_to_save.other.weight"].reason
    assert by_key["classifier.original_module.bias"].module == "classifier"
    assert "original copy" in by_key["classifier.original_module.bias"].reason
    assert by_key["bert.embeddings.word_embeddings.weight"].module == "bert.embeddings.word_embeddings"


def test_non_default_adapter_parent_directory_points_to_subdirectory(saved):
    s = saved("other-name")
    assert s.path.name == "other"
    with pytest.raises(AdapterInputError, match=r"adapter_name.*other"):
        open_adapter(s.path.parent)


@pytest.mark.parametrize("name", list(CASES))
def test_score_adapter_end_to_end(saved, name):
    s = saved(name)
    report = score_adapter(s.path)
    assert {score.module for score in report.layers} == set(s.modules)
    for score in report.layers:
        assert score.error is None and score.ssi is not None
        assert math.isfinite(score.ssi) and 0.0 <= score.ssi <= 1.0, (score.module, score.ssi)
        assert score.ssi > 0, "random factors give a non-zero update"
    assert [score.ssi for score in report.layers] == sorted((score.ssi for score in report.layers), reverse=True)


_SEGMENT = st.sampled_from(["model", "layers", "0", "1", "12", "self_attn", "q_proj", "k_proj", "mlp", "up_proj"])
_PATTERN = st.one_of(
    st.lists(_SEGMENT, min_size=1, max_size=3).map(".".join),
    st.sampled_from(
        [
            r"layers\.1\..*",
            r"(q|k)_proj",
            r"\w+_proj",
            "layers.1.self_attn.q_proj",
            r"^model\..*",
            "proj",
            "_proj",
            r"self_attn\.q_proj",
            r"layers\.\d+\.mlp\.up_proj",
        ]
    ),
)


@settings(max_examples=examples(300), deadline=None)
@given(
    keys=st.lists(_PATTERN, max_size=4, unique=True), module=st.lists(_SEGMENT, min_size=1, max_size=5).map(".".join)
)
def test_pattern_key_matches_peft(keys, module):
    """rank_pattern / alpha_pattern keys pick the same module as PEFT's own get_pattern_key (which returns the
    module name itself when nothing matches)."""
    assert (pattern_key(keys, module) or module) == get_pattern_key(keys, module)


# ---- config error paths -----------------------------------------------------------------------------------------


@pytest.fixture
def llama_adapter(tmp_path) -> Path:
    return save_lora(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter"
    )


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_rank_contradicting_config_r(llama_adapter):
    _edit_config(llama_adapter, r=8)
    with pytest.raises(AdapterInputError, match=r"q_proj'.*tensors have rank 4 but adapter_config.json gives r=8"):
        open_adapter(llama_adapter)


def test_rank_contradicting_rank_pattern(llama_adapter):
    _edit_config(llama_adapter, rank_pattern={"v_proj": 2})
    with pytest.raises(AdapterInputError, match=r"v_proj'.*rank 4 but adapter_config.json gives r=2.*rank_pattern"):
        open_adapter(llama_adapter)


def test_lora_a_without_lora_b(llama_adapter):
    _edit_tensors(llama_adapter, lambda t: t.pop(f"{Q}.lora_B.weight"))
    with pytest.raises(AdapterInputError, match=r"q_proj' has lora_A but no lora_B"):
        open_adapter(llama_adapter)


def test_inner_ranks_disagree(llama_adapter):
    _edit_tensors(llama_adapter, lambda t: t.update({f"{Q}.lora_B.weight": t[f"{Q}.lora_B.weight"][:, :3].clone()}))
    with pytest.raises(AdapterInputError, match=r"q_proj'.*inner ranks disagree, lora_A has 4 rows but lora_B has 3"):
        open_adapter(llama_adapter)


def test_conv_inner_ranks_that_are_no_grouping_still_disagree(tmp_path):
    """A grouped conv's lora_B has r / groups columns; any other mismatch is still an error."""
    path = save_lora(tiny_conv_net(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]), tmp_path / "adapter")
    key = "base_model.model.conv.lora_B.weight"
    _edit_tensors(path, lambda t: t.update({key: torch.ones(8, 3, 1, 1)}))
    with pytest.raises(AdapterInputError, match=r"'conv'.*inner ranks disagree, lora_A has 2 rows but lora_B has 3"):
        open_adapter(path)
