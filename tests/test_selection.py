"""The selection's numbers and limits: the robust z-score against a slow reference, the rank of the fit against a
dense one, the safe selection of prune (and the tau score marks), and what the summaries say about them."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from adapter_factory import layer_tensors, random_factors, write_adapter
from hypothesis import given
from hypothesis import strategies as st
from reference import reference
from typer.testing import CliRunner

from s3lora_cli.cli import EXIT_OK, EXIT_USAGE, app
from s3lora_cli.errors import UsageError
from s3lora_cli.report import fit_note
from s3lora_cli.scoring import ScoreOptions, score_adapter
from s3lora_cli.selection import MAD_TO_SIGMA, Selection, marked_tau, spread
from s3lora_cli.spectral import RANK_RTOL, Method

runner = CliRunner()


def fake_report(ssis):
    layers = [types.SimpleNamespace(module=f"m{i:03d}", ssi=s) for i, s in enumerate(ssis)]
    layers.sort(key=lambda s: (s.ssi is None, -(s.ssi or 0.0), s.module))
    return types.SimpleNamespace(layers=tuple(layers))


def slow_median(values):
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=30))
def test_robust_z_is_the_median_and_mad_formula(ssis):
    where = spread(fake_report(ssis))
    values = [s for s in ssis if s is not None]
    if not values:
        assert where.median is None and all(z is None for z in where.robust_z.values())
        return
    median = slow_median(values)
    mad = slow_median([abs(v - median) for v in values])
    assert where.median == median and where.mad == mad
    for i, s in enumerate(ssis):
        z = where.robust_z[f"m{i:03d}"]
        if s is None or mad == 0:
            assert z is None
        else:
            assert z == (s - median) / (MAD_TO_SIGMA * mad)


def test_mad_to_sigma_makes_mad_estimate_the_standard_deviation():
    # MAD of a standard normal is Phi^-1(3/4); 1.4826 is its reciprocal to 4 decimals
    quartile = math.sqrt(2) * 0.4769362762044699  # sqrt(2) erfinv(1/2)
    assert abs(MAD_TO_SIGMA - 1 / quartile) < 5e-5


def dense_fit_rank(a: torch.Tensor, b: torch.Tensor, scaling: float, method: str = "mas-svd") -> int:
    """The rank of the fitted F (of dW for svd) among the h values in SSI, from the slow dense reference of the
    spec (F formed entry by entry from its picks, its singular values by numpy)."""
    s = reference((scaling * b.double() @ a.double()).numpy(), method=method, rank=a.shape[0]).sigma
    return int((s > s[0] * RANK_RTOL).sum()) if s.size and s[0] > 0 else 0


@pytest.mark.parametrize("seed", range(3))
def test_fit_rank_counts_the_fit_s_directions(tmp_path, seed):
    a, b = random_factors(24, 32, 4, seed, sharp=seed == 2)
    row = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed + 10))
    flat_a, flat_b = row.repeat(4, 1), torch.linspace(1, 2, 24)[:, None].repeat(1, 4) / 4  # B @ A has rank 1
    tensors = {**layer_tensors("model.layers.0.q_proj", a, b), **layer_tensors("model.layers.1.q_proj", flat_a, flat_b)}
    adapter = write_adapter(tmp_path / "a", tensors)  # scaling 8 / 4 = 2
    for method in ("mas-svd", "svd"):
        report = score_adapter(adapter, ScoreOptions(device="cpu", dtype="float64", method=Method(method)))
        by_module = {s.module: s for s in report.layers}
        full, flat = by_module["model.layers.0.q_proj"], by_module["model.layers.1.q_proj"]
        assert full.fit_rank == dense_fit_rank(a, b, 2.0, method) > 1
        assert flat.fit_rank == dense_fit_rank(flat_a, flat_b, 2.0, method) == 1
        assert flat.ssi == pytest.approx(1.0, abs=1e-5)  # rank 1: SSI is 1 by construction (up to eps_s)
        if method == "mas-svd":
            assert fit_note(full) is None
            assert [(p.a, p.b) for p in flat.picks] == [(1, 1)] * 4  # one candidate each side: the only pair
            assert fit_note(flat) == "rank-1 fit (all 4 picks share right candidate 1): SSI is 1 by construction"


def test_fit_note_says_which_candidate_the_picks_shared():
    from s3lora_cli.adapters.base import LayerKind, LoraLayer
    from s3lora_cli.scoring import LayerScore
    from s3lora_cli.spectral import Pick

    layer = LoraLayer("m", LayerKind.LINEAR, (8, 8), 8, 8.0, 1.0, "F32", {})

    def note(picks, sigma=(2.0, 0.0, 0.0), components=3):
        return fit_note(LayerScore(layer, 1.0, sigma, components, 3, tuple(Pick(a, b, 1.0, 0.0) for a, b in picks)))

    by_construction = ": SSI is 1 by construction"
    assert note([(1, 2), (3, 2), (2, 2)]) == "rank-1 fit (all 3 picks share right candidate 2)" + by_construction
    assert note([(2, 1), (2, 3), (2, 2)]) == "rank-1 fit (all 3 picks share left candidate 2)" + by_construction
    assert note([(1, 1), (2, 2), (3, 3)]) == "rank-1 fit (picks 2-3 added no second direction)" + by_construction
    assert note([(1, 1), (2, 2)], sigma=(2.0, 1.0, 0.0)) is None  # rank 2: SSI below 1
    assert note([(1, 1)], components=1) is None  # M = 1: one direction is all the fit has


def test_score_marks_at_most_the_scored_layers():
    report = fake_report([0.9, 0.5, None, 0.3])
    assert marked_tau(report, None) == 3  # the paper's 10, capped
    assert marked_tau(report, 2) == 2 and marked_tau(report, 0) == 0
    with pytest.raises(UsageError, match="--tau 4 is more than the 3 scored layers"):
        marked_tau(report, 4)
    assert marked_tau(report, 4, allow_large=True) == 3


def test_prune_refuses_tau_0_and_large_selections(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")  # 4 layers
    cases = [
        (["--tau", "0"], "--tau must be at least 1: --tau 0 would prune nothing and write an unchanged copy"),
        (
            ["--tau", "1000"],
            "--tau 1000 is more than the 4 scored layers of this adapter: it would prune every "
            "layer; pass a smaller --tau (or --fraction), or --allow-large",
        ),
        ([], "--tau 10 is more than the 4 scored layers"),
        (["--tau", "3"], "--tau 3 selects 3 of the 4 scored layers (75 %), more than half of the adapter"),
        (["--fraction", "0.9"], "--fraction 0.9 selects 4 of the 4 scored layers (100 %)"),
        (["--threshold", "0"], "--threshold 0 selects 4 of the 4 scored layers (100 %)"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["prune", str(adapter), *args, "-q"])
        assert result.exit_code == EXIT_USAGE, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / "adapter-pruned").exists()
    result = runner.invoke(app, ["prune", str(adapter), "--tau", "3", "--allow-large", "--dry-run"])
    assert result.exit_code == EXIT_OK and "dry run: would prune 3 of 4 scored layers (75 %)" in result.stderr


def test_score_summary_says_what_ssi_means_and_what_to_do(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    result = runner.invoke(app, ["score", str(adapter), "--tau", "1"])
    assert result.exit_code == EXIT_OK
    summary = result.stderr
    assert "top-tau: 1 of 4 layers (25 %)" in summary
    assert "safety risk" in summary and "top-tau layers by SSI: a ranking, with no absolute threshold" in summary
    assert "compare with an approved baseline" in summary and "evaluate the pruned adapter" in summary
    assert "* top-tau: the 1 highest-SSI layers (25 % of 4)" in result.stdout
    assert "more than half" not in result.stdout
    default = runner.invoke(app, ["score", str(adapter), "-q"]).stdout  # the paper's 10, capped at the 4 layers
    assert "* top-tau: the 4 highest-SSI layers (100 % of 4)" in default
    assert "That is more than half of the layers: prune refuses it without --allow-large." in " ".join(default.split())
    assert runner.invoke(app, ["score", str(adapter), "--tau", "5"]).exit_code == EXIT_USAGE
    assert runner.invoke(app, ["score", str(adapter), "--tau", "5", "--allow-large", "-q"]).exit_code == EXIT_OK


def test_score_top_lists_the_highest_rows_only(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    table = runner.invoke(app, ["score", str(adapter), "--top", "2", "-q"]).stdout.splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["1", "2"]
    assert table[4] == "... 2 more layer(s) not listed; omit --top to list every layer"
    doc = json.loads(runner.invoke(app, ["score", str(adapter), "--top", "2", "-q", "-f", "json"]).stdout)
    assert len(doc["layers"]) == 4  # JSON keeps every layer
    markdown = runner.invoke(app, ["score", str(adapter), "--top", "1", "-q", "-f", "markdown"]).stdout
    assert markdown.count("| `model.layers.") == 1 and "3 more layer(s) not listed." in markdown
    assert runner.invoke(app, ["score", str(adapter), "--top", "0"]).exit_code == EXIT_USAGE


def test_json_layers_carry_robust_z_and_fit_rank(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    doc = json.loads(runner.invoke(app, ["score", str(adapter), "-q", "-f", "json"]).stdout)
    ssis = [layer["ssi"] for layer in doc["layers"]]
    median = slow_median(ssis)
    mad = slow_median([abs(s - median) for s in ssis])
    assert doc["summary"]["median_ssi"] == pytest.approx(median, rel=1e-11)
    for layer in doc["layers"]:
        assert layer["robust_z"] == pytest.approx((layer["ssi"] - median) / (MAD_TO_SIGMA * mad), rel=1e-9)
        assert 1 <= layer["fit_rank"] <= layer["top_h"]
    assert doc["summary"]["top_tau"] == [layer["module"] for layer in doc["layers"]]  # 4 layers: all marked


def test_tau_must_be_positive_for_a_selection():
    with pytest.raises(UsageError, match="at least 1"):
        Selection(tau=0)
    assert Selection.of(3, allow_large=True).allow_large
    assert Selection(tau=3).option() == "--tau 3" and Selection(fraction=0.25).option() == "--fraction 0.25"


def test_readme_documents_the_z_score_and_the_limits():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "(ssi - median) / (1.4826 MAD)" in readme and "`--allow-large`" in readme
