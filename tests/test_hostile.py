"""Hostile and broken adapters: every one ends with exit code 3 and a one-line message naming the problem, no
traceback, nothing written. CASES is the corpus: add a (name, builder, fragment) row to extend it."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_factory import PREFIX, config_dict, layer_tensors, random_factors, write_adapter
from typer.testing import CliRunner

from s3lora_cli import score_adapter
from s3lora_cli.adapters import safetensors_io
from s3lora_cli.adapters.config import MAX_CONFIG_BYTES, check_pattern
from s3lora_cli.cli import EXIT_GATE_FAILED, EXIT_INPUT, app
from s3lora_cli.errors import AdapterInputError

runner = CliRunner()
STEM = "model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---- building blocks ------------------------------------------------------------------------------------------


def safetensors_bytes(header: dict | bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (``length`` overrides it), header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def valid_header() -> tuple[dict, bytes]:
    """A header and data section for one q_proj layer: lora_A F32 [2, 4], lora_B F32 [4, 2] (32 bytes each)."""
    header = {
        "__metadata__": {"format": "pt"},
        f"{PREFIX}{STEM}.lora_A.weight": entry("F32", [2, 4], 0, 32),
        f"{PREFIX}{STEM}.lora_B.weight": entry("F32", [4, 2], 32, 64),
    }
    data = torch.arange(1, 17, dtype=torch.float32).numpy().tobytes()
    return header, data


def raw_adapter(path: Path, weights: bytes, config: dict | str | bytes | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS).write_bytes(weights)
    config = config_dict(r=2) if config is None else config
    if isinstance(config, dict):
        config = json.dumps(config)
    if isinstance(config, str):
        config = config.encode()
    (path / CONFIG).write_bytes(config)
    return path


def header_case(edit: Callable[[dict], object], data_edit: Callable[[bytes], bytes] = lambda d: d):
    """A builder that writes the valid one-layer adapter with its header edited in place by ``edit``."""

    def build(path: Path) -> Path:
        header, data = valid_header()
        edit(header)
        return raw_adapter(path, safetensors_bytes(header, data_edit(data)))

    return build


def bytes_case(weights: bytes):
    return lambda path: raw_adapter(path, weights)


def config_case(config: dict | str | bytes):
    def build(path: Path) -> Path:
        header, data = valid_header()
        return raw_adapter(path, safetensors_bytes(header, data), config)

    return build


def tensors_case(tensors: dict[str, torch.Tensor], **config):
    return lambda path: write_adapter(path, tensors, config_dict(**config))


def _set(header: dict, key: str, field: str, value) -> None:
    header[f"{PREFIX}{STEM}.{key}.weight"][field] = value


A_KEY, B_KEY = f"{PREFIX}{STEM}.lora_A.weight", f"{PREFIX}{STEM}.lora_B.weight"
DUPLICATE = (
    b'{"%s": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}, '
    b'"%s": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}, '
    b'"%s": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}'
) % (A_KEY.encode(), B_KEY.encode(), B_KEY.encode())
A, B = random_factors(8, 8, 2, 0)


def _config_text(**changes) -> str:
    return json.dumps({**config_dict(r=2), **changes})


def _without(key: str) -> dict:
    return {k: v for k, v in config_dict(r=2).items() if k != key}


# ---- the corpus -----------------------------------------------------------------------------------------------
# (name, builder(path) -> adapter path, fragment the one-line message must contain)

CASES = [
    # the container
    ("empty file", bytes_case(b""), "too short"),
    ("seven bytes", bytes_case(b"\x01" * 7), "too short"),
    ("header length past the end", bytes_case(safetensors_bytes(b"{}", length=1000)), "header length 1000"),
    ("header length absurd", bytes_case(safetensors_bytes(b"{}", length=2**63)), "limit"),
    ("header not JSON", bytes_case(safetensors_bytes(b"{bad json")), "not JSON"),
    ("header not UTF-8", bytes_case(safetensors_bytes(b'{"\xff\xfe": 1}')), "UTF-8"),
    ("header a JSON array", bytes_case(safetensors_bytes(b"[1, 2]")), "expected a JSON object"),
    ("header nested too deeply", bytes_case(safetensors_bytes(b"[" * 100_000 + b"]" * 100_000)), "nested"),
    ("header NaN", bytes_case(safetensors_bytes(b'{"x": NaN}')), "NaN"),
    (
        "header integer of 10^5 digits",
        bytes_case(safetensors_bytes(b'{"x": {"shape": [' + b"9" * 100_000 + b"]}}")),
        "not JSON",
    ),
    (
        "header duplicate tensor key",
        lambda p: raw_adapter(p, safetensors_bytes(DUPLICATE, valid_header()[1])),
        "appears twice",
    ),
    ("tensor entry not an object", header_case(lambda h: h.__setitem__(A_KEY, [1, 2])), "not an object"),
    ("tensor entry without data_offsets", header_case(lambda h: h[A_KEY].pop("data_offsets")), "no data_offsets"),
    ("unknown dtype", header_case(lambda h: _set(h, "lora_A", "dtype", "F128")), "unknown dtype 'F128'"),
    ("dtype not a string", header_case(lambda h: _set(h, "lora_A", "dtype", 4)), "unknown dtype 4"),
    ("negative dimension", header_case(lambda h: _set(h, "lora_A", "shape", [-2, -4])), "non-negative"),
    ("shape of strings", header_case(lambda h: _set(h, "lora_A", "shape", ["2", "4"])), "non-negative integers"),
    ("shape a boolean", header_case(lambda h: _set(h, "lora_A", "shape", [True, 4])), "non-negative integers"),
    ("offsets reversed", header_case(lambda h: _set(h, "lora_A", "data_offsets", [32, 0])), "0 <= begin <= end"),
    ("offsets of three", header_case(lambda h: _set(h, "lora_A", "data_offsets", [0, 16, 32])), "[begin, end]"),
    ("offsets not dtype x shape", header_case(lambda h: _set(h, "lora_A", "dtype", "F16")), "takes 16 bytes"),
    (
        "shape not dtype x shape",
        header_case(lambda h: _set(h, "lora_A", "shape", [2**40, 2**40])),
        "takes 4835703278458516698824704 bytes",
    ),
    (
        "offsets overlapping",
        header_case(
            lambda h: (_set(h, "lora_A", "data_offsets", [0, 32]), _set(h, "lora_B", "data_offsets", [16, 48]))
        ),
        "overlaps",
    ),
    (
        "offsets out of range",
        header_case(lambda h: _set(h, "lora_B", "data_offsets", [1 << 40, (1 << 40) + 32])),
        "truncated",
    ),
    (
        "offsets leaving a gap",
        header_case(lambda h: _set(h, "lora_B", "data_offsets", [40, 72]), lambda d: d + b"\0" * 8),
        "belong to no tensor",
    ),
    ("trailing bytes", header_case(lambda h: None, lambda d: d + b"\0" * 5), "5 bytes after the last tensor"),
    ("data section truncated", header_case(lambda h: None, lambda d: d[:-9]), "truncated"),
    ("metadata not strings", header_case(lambda h: h.__setitem__("__metadata__", {"format": 1})), "__metadata__"),
    ("metadata a list", header_case(lambda h: h.__setitem__("__metadata__", ["pt"])), "__metadata__"),
    # the tensors
    (
        "zero-size lora factors",
        tensors_case(layer_tensors(STEM, torch.zeros(0, 8), torch.zeros(8, 0))),
        f"'{STEM}': empty",
    ),
    ("zero-size input dimension", tensors_case(layer_tensors(STEM, torch.zeros(2, 0), B), r=2), f"'{STEM}': empty"),
    ("ranks that do not pair", tensors_case(layer_tensors(STEM, A, torch.zeros(8, 3)), r=2), "inner ranks disagree"),
    ("lora_A without lora_B", tensors_case({f"{STEM}.lora_A.weight": A}, r=2), "has lora_A but no lora_B"),
    ("lora_B without lora_A", tensors_case({f"{STEM}.lora_B.weight": B}, r=2), "has lora_B but no lora_A"),
    ("lora_A one-dimensional", tensors_case(layer_tensors(STEM, torch.zeros(16), B), r=2), "not LoRA factor shapes"),
    ("rank against config", tensors_case(layer_tensors(STEM, A, B), r=4), "rank 2 but adapter_config.json gives r=4"),
    ("no LoRA tensors", tensors_case({"model.embed_tokens.weight": torch.zeros(4, 4)}, r=2), "no LoRA tensors"),
    # adapter_config.json
    ("config not JSON", config_case("{r: 2"), "not valid JSON"),
    ("config not UTF-8", config_case(b'{"r": 2, "x": "\xff"}'), "cannot be read"),
    ("config an array", config_case("[1, 2]"), "expected a JSON object, got list"),
    ("config nested too deeply", config_case("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("config duplicate key", config_case('{"r": 2, "lora_alpha": 4, "r": 8}'), "'r' appears twice"),
    ("r a string", config_case(_config_text(r="2")), "'r' must be an integer, got '2'"),
    ("r a boolean", config_case(json.dumps({**config_dict(r=2), "r": True})), "'r' must be an integer, got True"),
    ("r a float", config_case(json.dumps({**config_dict(r=2), "r": 2.0})), "'r' must be an integer, got 2.0"),
    ("r zero", config_case(json.dumps({**config_dict(r=2), "r": 0})), "'r' is 0"),
    ("r negative", config_case(json.dumps({**config_dict(r=2), "r": -2})), "'r' is -2"),
    ("r of 5000 digits", config_case('{"r": ' + "9" * 5000 + ', "lora_alpha": 8}'), "not valid JSON"),
    ("r missing", config_case(_without("r")), "'r' is missing"),
    ("lora_alpha missing", config_case(_without("lora_alpha")), "'lora_alpha' is missing"),
    ("lora_alpha null", config_case(_config_text(lora_alpha=None)), "'lora_alpha' is missing"),
    ("lora_alpha a string", config_case(_config_text(lora_alpha="16")), "'lora_alpha' must be a number"),
    ("lora_alpha NaN", config_case(_config_text(lora_alpha=float("nan"))), "'lora_alpha' must be a number"),
    ("lora_alpha Infinity", config_case(_config_text(lora_alpha=float("inf"))), "'lora_alpha' must be a number"),
    ("peft_type not LoRA", config_case(_config_text(peft_type="LOHA")), "peft_type is 'LOHA'"),
    ("peft_type a number", config_case(_config_text(peft_type=7)), "peft_type is 7"),
    ("use_rslora a string", config_case(_config_text(use_rslora="false")), "'use_rslora' must be true or false"),
    ("target_modules a number", config_case(_config_text(target_modules=5)), "'target_modules' must be a string"),
    ("rank_pattern a list", config_case(_config_text(rank_pattern=["q_proj"])), "'rank_pattern' must be an object"),
    ("rank_pattern exponential", config_case(_config_text(rank_pattern={"(a+)+$": 2})), "repeats a group"),
    (
        "rank_pattern alternation repeated",
        config_case(_config_text(rank_pattern={"(q|q_)*proj": 2})),
        "repeats a group",
    ),
    ("rank_pattern backreference", config_case(_config_text(rank_pattern={r"(q)\1": 2})), "backreference"),
    ("rank_pattern many repetitions", config_case(_config_text(rank_pattern={".*a.*b.*c": 2})), "3 repetitions"),
    ("rank_pattern too long", config_case(_config_text(rank_pattern={"q" * 300: 2})), "longer than 256"),
    ("rank_pattern invalid", config_case(_config_text(rank_pattern={"(": 2})), "invalid regular expression"),
    (
        "rank_pattern invalid in PEFT's wrapper",
        config_case(_config_text(rank_pattern={"(?i)q": 2})),
        "invalid regular expression",
    ),
    ("rank_pattern value a string", config_case(_config_text(rank_pattern={"q_proj": "2"})), "must be an integer"),
    ("rank_pattern value zero", config_case(_config_text(rank_pattern={"q_proj": 0})), "ranks must be positive"),
    ("alpha_pattern value a boolean", config_case(_config_text(alpha_pattern={"q_proj": True})), "must be a number"),
    (
        "module name too long for patterns",
        lambda p: write_adapter(p, layer_tensors("m" * 600, A, B), config_dict(r=2, rank_pattern={"q_proj": 2})),
        "too long to match",
    ),
]


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def hostile(request, tmp_path) -> tuple[Path, str]:
    _, build, fragment = request.param
    return build(tmp_path / "adapter"), fragment


def expect_input_error(result, fragment: str) -> None:
    output = result.stdout + result.stderr
    assert result.exit_code == EXIT_INPUT, (result.exit_code, output)
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


def test_score_refuses(hostile):
    path, fragment = hostile
    expect_input_error(runner.invoke(app, ["score", str(path), "-q", "--device", "cpu"]), fragment)


def test_library_raises_adapter_input_error(hostile):
    path, fragment = hostile
    with pytest.raises(AdapterInputError) as info:
        score_adapter(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "header length absurd",
        "offsets overlapping",
        "data section truncated",
        "zero-size lora factors",
        "rank_pattern exponential",
        "config duplicate key",
    ],
)
def test_prune_refuses_and_writes_nothing(tmp_path, name):
    _, build, fragment = next(case for case in CASES if case[0] == name)
    path = build(tmp_path / "adapter")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "pruned"
    expect_input_error(runner.invoke(app, ["prune", str(path), "-o", str(out), "-q", "--device", "cpu"]), fragment)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- files that are not what they claim -----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_refused_without_blocking(tmp_path):
    header, data = valid_header()
    path = raw_adapter(tmp_path / "adapter", safetensors_bytes(header, data))
    (path / WEIGHTS).unlink()
    os.mkfifo(path / WEIGHTS)
    expect_input_error(runner.invoke(app, ["score", str(path / WEIGHTS), "-q"]), "not a regular file")
    (path / WEIGHTS).unlink()
    path = raw_adapter(tmp_path / "adapter2", safetensors_bytes(header, data))
    (path / CONFIG).unlink()
    os.mkfifo(path / CONFIG)
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), "not a regular file")


def test_config_over_the_size_limit(tmp_path):
    header, data = valid_header()
    path = raw_adapter(tmp_path / "adapter", safetensors_bytes(header, data))
    with open(path / CONFIG, "r+b") as fh:  # sparse: costs no disk
        fh.truncate(MAX_CONFIG_BYTES + 1)
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), "larger than")


class _Marker:
    """Unpickling this would create a file: what a malicious adapter_model.bin does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    marker = tmp_path / "marker"
    a, b = random_factors(8, 8, 2, 0)
    torch.save(
        {f"{PREFIX}{STEM}.lora_A.weight": a, f"{PREFIX}{STEM}.lora_B.weight": b, "x": _Marker(str(marker))},
        path / "adapter_model.bin",
    )
    (path / CONFIG).write_text(json.dumps(config_dict(r=2)))
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), "weights_only=True")
    assert not marker.exists()
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), "refused")
    assert not marker.exists()


@pytest.mark.parametrize(
    "state,fragment",
    [
        ([1, 2], "mapping of names to tensors"),
        ({"a": 1}, "mapping of names to tensors"),
        ({1: torch.zeros(2)}, "names (strings)"),
        ({"a": torch.zeros(2, 2).to_sparse()}, "not a plain dense real-valued tensor"),
        ({"a": torch.zeros(2, dtype=torch.complex64)}, "not a plain dense real-valued tensor"),
    ],
)
def test_bin_that_is_not_a_state_dict(tmp_path, state, fragment):
    path = tmp_path / "adapter"
    path.mkdir()
    torch.save(state, path / "adapter_model.bin")
    (path / CONFIG).write_text(json.dumps(config_dict(r=2)))
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), fragment)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bin_garbage(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04garbage" * 10)
    (path / CONFIG).write_text(json.dumps(config_dict(r=2)))
    expect_input_error(runner.invoke(app, ["score", str(path), "-q"]), "refused")


def test_other_formats_share_the_hardened_source(tmp_path):
    """A kohya-style file (not PEFT) with a truncated data section, and a diffusers file whose metadata JSON is
    nested too deeply: refused with exit code 3 like a PEFT adapter."""
    from format_factory import small_peft, to_diffusers, to_kohya
    from safetensors.torch import load_file, save_file

    peft = small_peft(tmp_path / "peft")
    kohya = to_kohya(peft, tmp_path / "kohya.safetensors")
    kohya.write_bytes(kohya.read_bytes()[:-7])
    expect_input_error(runner.invoke(app, ["score", str(kohya), "-q"]), "truncated")
    diffusers = to_diffusers(peft, tmp_path / "pytorch_lora_weights.safetensors")
    save_file(load_file(str(diffusers)), str(diffusers), metadata={"lora_adapter_metadata": "[" * 50_000})
    expect_input_error(runner.invoke(app, ["score", str(diffusers), "-q"]), "lora_adapter_metadata")


# ---- non-finite values: scored as "not scored", and check fails on them --------------------------------------


@pytest.fixture
def non_finite(tmp_path) -> Path:
    a, b = random_factors(8, 8, 2, 0)
    tensors = layer_tensors(STEM, a, b)
    a2, b2 = random_factors(8, 8, 2, 1)
    a2[0, 0] = float("inf")
    b2[1, 1] = float("nan")
    tensors.update(layer_tensors("model.layers.1.self_attn.q_proj", a2, b2))
    return write_adapter(tmp_path / "adapter", tensors, config_dict(r=2))


def test_non_finite_layer_is_reported_unscored(non_finite):
    report = score_adapter(non_finite, None)
    bad = {s.module: s for s in report.layers}["model.layers.1.self_attn.q_proj"]
    assert bad.ssi is None and "non-finite" in bad.error
    assert report.layers[-1] is bad  # unscored layers rank last


def test_check_fails_on_non_finite(non_finite):
    result = runner.invoke(app, ["check", str(non_finite), "--max-ssi", "1", "-q", "--format", "json"])
    assert result.exit_code == EXIT_GATE_FAILED, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    gate = json.loads(result.stdout)["gate"]
    rules = {(v["module"], v["rule"]) for v in gate["violations"] if v["fails"]}
    assert ("model.layers.1.self_attn.q_proj", "non-finite") in rules


# ---- memory: one layer at a time, never the whole file ---------------------------------------------------------


def test_scoring_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """Every tensor read for a layer is released before the next layer's tensors are read."""
    tensors = {}
    for block in range(4):
        tensors.update(layer_tensors(f"model.layers.{block}.q_proj", *random_factors(8, 8, 2, block)))
    path = write_adapter(tmp_path / "adapter", tensors, config_dict(r=2))
    alive: list[weakref.ref] = []
    most = 0
    real_get = safetensors_io.SafetensorsSource.get

    def get(self, key):
        nonlocal most
        tensor = real_get(self, key)
        alive[:] = [ref for ref in alive if ref() is not None]
        alive.append(weakref.ref(tensor))
        most = max(most, len(alive))
        return tensor

    monkeypatch.setattr(safetensors_io.SafetensorsSource, "get", get)
    report = score_adapter(path)
    assert len(report.layers) == 4 and all(s.ssi is not None for s in report.layers)
    assert most <= 2  # lora_A and lora_B of the layer being scored


STREAM = """
import resource, sys
import torch
from s3lora_cli.cli import app
from s3lora_cli.engine import mas_svd
mas_svd(torch.randn(8, 2), torch.randn(2, 8))  # what scoring the small layer loads and compiles, before the limit
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
headroom = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_DATA, (used + headroom, used + headroom))
app(["score", sys.argv[1], "-q", "--device", "cpu", "--format", "json"])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA bounds mmap only on Linux")
def test_file_larger_than_the_memory_limit(tmp_path):
    """A 512 MiB adapter (a sparse file: a huge non-LoRA tensor beside one small layer) scores in a process whose
    data segment (heap and private mappings) may grow by 256 MiB at most once torch and s3lora are loaded (the
    limit is set above what the interpreter holds then, which differs by build: torch's CUDA build maps far more
    than its CPU build): nothing reads, maps or allocates by the file's size; sha256 streams it."""
    a, b = random_factors(8, 8, 2, 0)
    huge = 2**29 // 4
    header = {
        f"{PREFIX}{STEM}.lora_A.weight": entry("F32", [2, 8], 0, 64),
        f"{PREFIX}{STEM}.lora_B.weight": entry("F32", [8, 2], 64, 128),
        f"{PREFIX}model.embed_tokens.weight": entry("F32", [huge], 128, 128 + 4 * huge),
    }
    path = raw_adapter(tmp_path / "adapter", safetensors_bytes(header, a.numpy().tobytes() + b.numpy().tobytes()))
    with open(path / WEIGHTS, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) + 4 * huge)
    result = subprocess.run(
        [sys.executable, "-c", STREAM, str(path), str(256 * 2**20)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [layer["module"] for layer in report["layers"]] == [STEM]
    assert [item["key"] for item in report["not_analysed"]] == [f"{PREFIX}model.embed_tokens.weight"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA bounds mmap only on Linux")
def test_the_memory_limit_test_can_fail(tmp_path):
    """The limit of the test above is tight enough to catch a read by the file's size: a process that reads
    the 512 MiB file into memory under the same limit fails."""
    path = tmp_path / "big"
    with open(path, "wb") as fh:
        fh.truncate(2**29)
    reader = STREAM.replace(
        'app(["score", sys.argv[1], "-q", "--device", "cpu", "--format", "json"])', "open(sys.argv[1], 'rb').read()"
    )
    result = subprocess.run(
        [sys.executable, "-c", reader, str(path), str(256 * 2**20)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "MemoryError" in result.stderr


# ---- the pattern rule itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "q_proj",
        r"layers\.1\..*",
        r"(q|k)_proj",
        r"\w+_proj",
        r"^model\..*",
        r"layers\.\d+\.mlp\.up_proj",
        "model.layers.0.self_attn.q_proj",
        r"^(?!.*vision).*q_proj",
        r"mlp\.(up|down)_proj",
        r"\d{1,3}",
    ],
)
def test_usual_patterns_are_accepted(pattern):
    assert check_pattern(pattern) is None
