"""The result does not depend on the machine: the same adapter scored with 1 or 2 threads, with the code paths
of another CPU (the compiled kernels built for an AVX2 CPU or a baseline x86-64 one, PyTorch's and MKL's
kernels restricted to AVX2 or to SSE: what another CPU's vector width and instruction set change), and
without the compiled kernels at all, gives the same picks on every layer and SSI equal to 1e-6 relative in
float32, 1e-12 in float64 (the guarantee the README states)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from adapter_factory import config_dict, layer_tensors, write_adapter

from s3lora_cli.engine import kernels

SCORE = """
import sys
from s3lora_cli.engine import kernels
from s3lora_cli.cli import app
if sys.argv[1] == "uncompiled":
    kernels.available = False
app(["score", sys.argv[2], "-q", "--device", "cpu", "--format", "json", "--dtype", sys.argv[3]])
"""

TOLERANCE = {"float32": 1e-6, "float64": 1e-12}

TWO, ONE = {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}, {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
SETTINGS = {
    "this CPU, 2 threads": ("compiled", TWO),
    "this CPU, 1 thread": ("compiled", ONE),
    "AVX2 code paths, 2 threads": (
        "compiled",
        {**TWO, "NUMBA_CPU_NAME": "haswell", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    ),
    "baseline x86-64 code paths, 1 thread": (
        "compiled",
        {**ONE, "NUMBA_CPU_NAME": "generic", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    ),
    "uncompiled, 1 thread": ("uncompiled", ONE),
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """Layers large enough for the screened fit and its kernels (768 x 352, r = 8: above ``fit.WHOLE_MAX_ENTRIES``): a
    decaying spectrum, a near-isotropic one (plain Gaussian factors: every step a near tie), one dominant direction;
    and a small layer, fitted whole (``whole``)."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for index, kind in enumerate(["decaying", "isotropic", "dominant", "small"]):
        d, k = (96, 80) if kind == "small" else (768, 352)
        a, b = torch.randn(8, k, generator=gen), torch.randn(d, 8, generator=gen)
        if kind == "decaying":
            b /= torch.arange(1, 9)
        if kind == "dominant":
            b[:, 0] *= 20.0
        tensors.update(layer_tensors(f"model.layers.{index}.self_attn.q_proj", a, b))
    return write_adapter(
        tmp_path_factory.mktemp("portable") / "adapter", tensors, config_dict(r=8, lora_alpha=16), dtype=torch.bfloat16
    )


def _score(adapter, setting: str, dtype: str) -> dict:
    path, extra = SETTINGS[setting]
    env = {**os.environ, **extra}
    result = subprocess.run(
        [sys.executable, "-c", SCORE, path, str(adapter), dtype], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {layer["module"]: layer for layer in json.loads(result.stdout)["layers"]}


@pytest.mark.skipif(not kernels.available, reason="numba is not available")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the settings name x86-64 CPUs")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_picks_and_ssi_on_every_setting(adapter, dtype):
    results = {setting: _score(adapter, setting, dtype) for setting in SETTINGS}
    first, *others = results
    for setting in others:
        assert results[setting].keys() == results[first].keys()
        for module, layer in results[first].items():
            other = results[setting][module]
            picks = [(p["a"], p["b"]) for p in layer["picks"]]
            assert [(p["a"], p["b"]) for p in other["picks"]] == picks, (setting, module)
            assert other["ssi"] == pytest.approx(layer["ssi"], rel=TOLERANCE[dtype], abs=0), (setting, module)
