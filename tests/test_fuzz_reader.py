"""Fuzzing the reader: valid small adapters, mutated (bit flips, truncation, header and config edits), must either
score or be refused with AdapterInputError, never anything else, and never read a tensor larger than the file.

The mutators take a ``Draw`` (where choices come from) so that hypothesis drives them here, with shrinking, and
scripts/fuzz_reader.py drives the same mutators from a seeded random generator for as long as asked."""

from __future__ import annotations

import json
import math
import random
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch
from adapter_factory import config_dict, layer_tensors, random_factors, write_adapter
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from profiles import examples

from s3lora_cli import ScoreOptions, report, score_adapter
from s3lora_cli.adapters.safetensors_io import SafetensorsSource
from s3lora_cli.errors import AdapterInputError

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "C64", "F8_E4M3", "F128", "", "f32"]
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, -1, -8, 2**31, 2**32 - 1, 2**63, 2**64, 10**30]
CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "peft_type",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "target_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "base_model_name_or_path",
    "target_parameters",
    "exclude_modules",
    "layers_to_transform",
]
PATTERNS = [
    "q_proj",
    r"layers\.1\..*",
    "(a+)+$",
    "(q|k)_proj",
    "(",
    r"(\w)\1",
    ".*.*.*x",
    "v_proj",
    "x" * 300,
    "(?i)q",
    "a)|(b",
    r"\d+",
    "[",
    "model.layers.0.self_attn.q_proj",
]


class Draw:
    """Where the mutators' choices come from."""

    def integer(self, low: int, high: int) -> int: ...
    def choice(self, items: Sequence): ...
    def blob(self, max_size: int) -> bytes: ...
    def json_value(self): ...


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(INTERESTING),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


class HypothesisDraw(Draw):
    def __init__(self, data) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def choice(self, items: Sequence):
        return self.data.draw(st.sampled_from(list(items)))

    def blob(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))

    def json_value(self):
        return self.data.draw(JSON)


class RandomDraw(Draw):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, items: Sequence):
        return self.rng.choice(list(items))

    def blob(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))

    def json_value(self, depth: int = 0):
        kind = self.rng.randrange(8 if depth < 2 else 6)
        if kind == 0:
            return self.rng.choice([None, True, False])
        if kind == 1:
            return self.rng.choice(INTERESTING + [self.rng.randint(-(2**70), 2**70)])
        if kind == 2:
            return self.rng.choice([0.5, -1.5, 1e308, float("nan"), float("inf"), -0.0, self.rng.random()])
        if kind in (3, 4, 5):
            return "".join(self.rng.choice("ab.*+()[]\\01_ \u00e9\n") for _ in range(self.rng.randint(0, 8)))
        if kind == 6:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {
            self.rng.choice(["r", "x", "", "a.b", "0"]): self.json_value(depth + 1)
            for _ in range(self.rng.randint(0, 3))
        }


# ---- seeds: valid adapters ------------------------------------------------------------------------------------


def _seeds() -> list[tuple[bytes, bytes]]:
    """(weights, config) of a few valid adapters: plain f32, bf16 with patterns, an embedding and a DoRA layer."""
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {}
        for block in range(2):
            tensors.update(layer_tensors(f"model.layers.{block}.self_attn.q_proj", *random_factors(6, 5, 2, block)))
        variants = [
            (tensors, config_dict(r=2), torch.float32),
            (
                tensors,
                config_dict(r=2, rank_pattern={r"layers\.1\..*": 2}, alpha_pattern={"q_proj": 4}),
                torch.bfloat16,
            ),
            (
                {
                    "model.embed_tokens.lora_embedding_A": torch.randn(
                        2, 7, generator=torch.Generator().manual_seed(3)
                    ),
                    "model.embed_tokens.lora_embedding_B": torch.randn(
                        4, 2, generator=torch.Generator().manual_seed(4)
                    ),
                    **layer_tensors("model.layers.0.mlp.up_proj", *random_factors(3, 4, 2, 5)),
                    "model.layers.0.mlp.up_proj.lora_magnitude_vector.weight": torch.ones(3),
                },
                config_dict(r=2, use_dora=True),
                torch.float16,
            ),
        ]
        for index, (ts, cfg, dtype) in enumerate(variants):
            path = write_adapter(Path(tmp) / str(index), ts, cfg, dtype=dtype)
            seeds.append(((path / WEIGHTS).read_bytes(), (path / CONFIG).read_bytes()))
    return seeds


SEEDS = _seeds()


# ---- mutators -------------------------------------------------------------------------------------------------


def _split(weights: bytes) -> tuple[dict, bytes] | None:
    if len(weights) < 8:
        return None
    length = struct.unpack("<Q", weights[:8])[0]
    try:
        header = json.loads(weights[8 : 8 + length])
    except (ValueError, RecursionError):
        return None
    return (header, weights[8 + length :]) if isinstance(header, dict) else None


def _join(header: dict, data: bytes, draw: Draw) -> bytes:
    text = json.dumps(header).encode()
    length = len(text)
    if draw.integer(0, 9) == 0:
        length = max(0, length + draw.choice([-3, -1, 1, 5, 2**40, 2**64 - 1 - length]))
    return struct.pack("<Q", length) + text + data


def flip_bits(weights: bytes, config: bytes, draw: Draw) -> tuple[bytes, bytes]:
    in_weights = draw.integer(0, 3) > 0
    target = bytearray(weights if in_weights else config)
    for _ in range(draw.integer(1, 8)):
        if target:
            target[draw.integer(0, len(target) - 1)] ^= 1 << draw.integer(0, 7)
    return (bytes(target), config) if in_weights else (weights, bytes(target))


def truncate(weights: bytes, config: bytes, draw: Draw) -> tuple[bytes, bytes]:
    if draw.integer(0, 4):
        return weights[: draw.integer(0, max(0, len(weights) - 1))], config
    return weights, config[: draw.integer(0, max(0, len(config) - 1))]


def splice(weights: bytes, config: bytes, draw: Draw) -> tuple[bytes, bytes]:
    at = draw.integer(0, len(weights))
    return weights[:at] + draw.blob(64) + weights[at:], config


def edit_header(weights: bytes, config: bytes, draw: Draw) -> tuple[bytes, bytes]:
    parts = _split(weights)
    if parts is None:
        return weights, config
    header, data = parts
    names = [k for k in header if k != "__metadata__"] or ["x"]
    name = draw.choice(names)
    op = draw.integer(0, 7)
    entry = header.get(name) if isinstance(header.get(name), dict) else {}
    if op == 0:
        entry["dtype"] = draw.choice(DTYPES)
    elif op == 1 and isinstance(entry.get("shape"), list) and entry["shape"]:
        shape = list(entry["shape"])
        shape[draw.integer(0, len(shape) - 1)] = draw.choice(INTERESTING)
        entry["shape"] = shape if draw.integer(0, 3) else shape + [draw.choice([0, 1, 2])]
    elif op == 2 and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
        offsets = list(entry["data_offsets"])
        which = draw.integer(0, 1)
        delta = draw.choice([-4, -1, 1, 4, 2**32, -(2**20)])
        offsets[which] = offsets[which] + delta if isinstance(offsets[which], int) else delta
        entry["data_offsets"] = offsets
    elif op == 3:
        entry[draw.choice(["dtype", "shape", "data_offsets", "extra"])] = draw.json_value()
    elif op == 4:
        header.pop(name, None)
    elif op == 5:
        stem = draw.choice(["model.layers.0.self_attn.q_proj", "model.layers.9.k_proj", "model.embed_tokens", "x"])
        role = draw.choice(
            [
                ".lora_A.weight",
                ".lora_B.weight",
                ".lora_embedding_A",
                ".lora_B.default.weight",
                ".weight",
                ".lora_magnitude_vector.weight",
                ".lora_B.bias",
            ]
        )
        header[stem + role] = draw.choice([dict(entry), draw.json_value()])
    elif op == 6:
        header["__metadata__"] = draw.json_value()
    else:
        header = draw.json_value()
        return _join(header, data, draw) if isinstance(header, dict) else (
            struct.pack("<Q", len(json.dumps(header))) + json.dumps(header).encode() + data
        ), config
    if entry and name in header:
        header[name] = entry
    return _join(header, data, draw), config


def edit_config(weights: bytes, config: bytes, draw: Draw) -> tuple[bytes, bytes]:
    try:
        raw = json.loads(config)
    except (ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict) or draw.integer(0, 9) == 0:
        return weights, json.dumps(draw.json_value()).encode()
    key = draw.choice(CONFIG_KEYS + ["x"])
    op = draw.integer(0, 3)
    if op == 0:
        raw.pop(key, None)
    elif op == 1 and key in ("rank_pattern", "alpha_pattern"):
        raw[key] = {draw.choice(PATTERNS): draw.choice(INTERESTING + [2.5, True, "2", None])}
    else:
        raw[key] = draw.json_value()
    return weights, json.dumps(raw).encode()


MUTATORS = [flip_bits, truncate, splice, edit_header, edit_header, edit_config]


def mutate(draw: Draw) -> tuple[bytes, bytes]:
    """A seed adapter with one to three mutations applied: (weights bytes, config bytes)."""
    weights, config = draw.choice(SEEDS)
    for _ in range(draw.integer(1, 3)):
        weights, config = draw.choice(MUTATORS)(weights, config, draw)
    return weights, config


# ---- the property ---------------------------------------------------------------------------------------------


def run_reader(directory: Path, weights: bytes, config: bytes) -> str:
    """Write the adapter into ``directory`` and score it on the CPU: "scored" or "refused". Any other exception
    propagates. Every tensor read must be no larger than the file (no allocation from a size the file claims
    but does not hold)."""
    (directory / WEIGHTS).write_bytes(weights)
    (directory / CONFIG).write_bytes(config)
    real_get = SafetensorsSource.get

    def bounded_get(self, key):
        tensor = real_get(self, key)
        assert tensor.numel() * tensor.element_size() <= len(weights), (key, tuple(tensor.shape))
        return tensor

    with mock.patch.object(SafetensorsSource, "get", bounded_get):
        try:
            result = score_adapter(directory, ScoreOptions(device="cpu"))
        except AdapterInputError as exc:
            assert "\n" not in str(exc), str(exc)
            return "refused"
    for score in result.layers:
        assert score.ssi is None or (math.isfinite(score.ssi) and 0.0 <= score.ssi <= 1.0), score
    report.render_json(report.report_dict(result))
    return "scored"


@settings(
    max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_mutated_adapters_score_or_are_refused(data):
    weights, config = mutate(HypothesisDraw(data))
    with tempfile.TemporaryDirectory() as tmp:
        event(run_reader(Path(tmp), weights, config))


def test_seeds_score():
    with tempfile.TemporaryDirectory() as tmp:
        for index, (weights, config) in enumerate(SEEDS):
            directory = Path(tmp) / str(index)
            directory.mkdir()
            assert run_reader(directory, weights, config) == "scored"
