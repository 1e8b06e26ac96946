"""The serialisation of a score report: one form of a layer's result, of the adapter and of the tensors left out,
shared by the JSON report (``report_dict``, schema_version 2, documented in README.md), the prune document and
the store's score cache (``cache_dict`` and its inverse ``report_from_dict``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from s3lora_cli.adapters import LayerKind, LoraLayer, SkippedTensor
from s3lora_cli.scoring import AdapterInfo, LayerScore, ScoreOptions, ScoreReport, rank_key
from s3lora_cli.selection import spread

SCHEMA_VERSION = 2
TOOL_NAME = "s3lora"

# The words every output uses for what it marks: one per command, the same in the table, JSON, Markdown and CSV.
TOP_TAU = "top_tau"  # score: among the tau highest-SSI layers (paper Eq. 5), what prune --tau would remove
PRUNED = "pruned"  # prune: the layers whose update was (or, in a dry run, would be) removed
VIOLATION = "violation"  # check, admit: the layer broke a gate rule
SUMMARY_KEYS = {TOP_TAU: "top_tau", PRUNED: "pruned", VIOLATION: "violations"}


def finite(x: float | None, digits: int = 12) -> float | None:
    """A float rounded to ``digits`` significant digits, so that the last bits of a platform's BLAS do not
    change the document; None stays None (JSON null)."""
    return None if x is None else float(format(float(x), f".{digits}g"))


def render_json(doc: Mapping[str, Any]) -> str:
    """A document as JSON text: indented, NaN and Inf refused, one newline at the end."""
    return json.dumps(doc, allow_nan=False, indent=2) + "\n"


# --- the shared fields ------------------------------------------------------------------------------------


def layer_fields(layer: LoraLayer) -> dict[str, Any]:
    """What identifies a LoRA layer, in every document that lists layers."""
    return {
        "module": layer.module,
        "kind": layer.kind.value,
        "shape": list(layer.shape),
        "r": layer.r,
        "lora_alpha": layer.lora_alpha,
        "scaling": layer.scaling,
        "dtype": layer.dtype,
    }


def adapter_fields(info: AdapterInfo) -> dict[str, Any]:
    """What describes the scored adapter (its path aside, which the reader of a cache entry supplies)."""
    return {
        "weights_file": info.weights_file,
        "sha256": info.sha256,
        "format": info.format,
        "base_model_name_or_path": info.base_model_name_or_path,
        "peft_type": info.peft_type,
        "r": info.r,
        "lora_alpha": info.lora_alpha,
        "use_rslora": info.use_rslora,
        "use_dora": info.use_dora,
        "target_modules": info.target_modules,
    }


def skipped_fields(tensor: SkippedTensor) -> dict[str, Any]:
    """A tensor that was not analysed, and why."""
    return {"key": tensor.key, "module": tensor.module, "shape": list(tensor.shape), "reason": tensor.reason}


# --- the JSON report (score, prune) -----------------------------------------------------------------------


def layer_dict(
    rank: int, score: LayerScore, marked: bool, mark: str = TOP_TAU, robust_z: float | None = None
) -> dict[str, Any]:
    """One layer of the JSON report: its fields, its result rounded (``finite``), and whether ``mark`` applies."""
    return {
        "rank": rank,
        **layer_fields(score.layer),
        "ssi": finite(score.ssi),
        "robust_z": finite(robust_z),
        "sigma": [finite(s) for s in score.sigma],
        "sigma_1": finite(score.sigma_1),
        "sigma_sum": finite(score.sigma_sum),
        "components": score.components,
        "top_h": score.top_h,
        "fit_rank": score.fit_rank,
        "picks": [{"a": p.a, "b": p.b, "delta": finite(p.delta)} for p in score.picks],
        mark: marked,
        "notes": list(score.notes),
        "error": score.error,
    }


def report_dict(
    report: ScoreReport, marked: set[str] | tuple = (), tau: int | None = None, mark: str = TOP_TAU
) -> dict[str, Any]:
    """The JSON document of a report (schema_version 2, documented in README.md). ``marked`` are the modules
    that ``mark`` (TOP_TAU, PRUNED or VIOLATION) applies to."""
    a = report.adapter
    scored = [s for s in report.layers if s.ssi is not None]
    where = spread(report)
    targets = sorted(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": report.tool_version},
        "adapter": {"path": a.path, **adapter_fields(a), "target_modules": targets},
        "parameters": {**report.parameters, "tau": tau},
        "summary": {
            "layers": len(report.layers),
            "scored": len(scored),
            "non_finite": len(report.layers) - len(scored),
            "max_ssi": finite(scored[0].ssi) if scored else None,
            "median_ssi": finite(where.median),
            "mad_ssi": finite(where.mad),
            "rank_one_fits": sum(s.fit_rank == 1 and s.components > 1 for s in scored),
            SUMMARY_KEYS[mark]: [s.module for s in report.layers if s.module in marked],
        },
        "layers": [
            layer_dict(i, s, s.module in marked, mark, where.robust_z[s.module])
            for i, s in enumerate(report.layers, start=1)
        ],
        "not_analysed": [skipped_fields(t) for t in report.not_analysed],
    }


# --- the cache form (exact values, everything the gate uses; the L1 fit's picks are left out) ---------------


def cache_dict(report: ScoreReport, cache_format: int) -> dict[str, Any]:
    """A ScoreReport as a JSON-able document with its values exact, read back by ``report_from_dict``."""

    def layer(s: LayerScore) -> dict[str, Any]:
        lay = s.layer
        return {
            **layer_fields(lay),
            "keys": lay.keys,
            "layer_notes": list(lay.notes),
            "groups": lay.groups,
            "ssi": s.ssi,
            "sigma": list(s.sigma),
            "components": s.components,
            "top_h": s.top_h,
            "notes": list(s.notes),
            "error": s.error,
        }

    return {
        "cache_format": cache_format,
        "tool_version": report.tool_version,
        "device": report.device,
        "parameters": report.parameters,
        "adapter": adapter_fields(report.adapter),
        "layers": [layer(s) for s in report.layers],
        "not_analysed": [skipped_fields(t) for t in report.not_analysed],
    }


def report_from_dict(doc: Mapping[str, Any], path: str, options: ScoreOptions) -> ScoreReport:
    """The ScoreReport ``cache_dict`` stored, for the adapter now at ``path``."""
    layers = []
    for d in doc["layers"]:
        lay = LoraLayer(
            d["module"],
            LayerKind(d["kind"]),
            tuple(d["shape"]),
            d["r"],
            d["lora_alpha"],
            d["scaling"],
            d["dtype"],
            dict(d["keys"]),
            tuple(d["layer_notes"]),
            d["groups"],
        )
        layers.append(
            LayerScore(
                lay, d["ssi"], tuple(d["sigma"]), d["components"], d["top_h"], notes=tuple(d["notes"]), error=d["error"]
            )
        )
    a = doc["adapter"]
    info = AdapterInfo(
        path,
        a["weights_file"],
        a["sha256"],
        a["format"],
        a["base_model_name_or_path"],
        a["peft_type"],
        a["r"],
        a["lora_alpha"],
        a["use_rslora"],
        a["use_dora"],
        a["target_modules"],
    )
    skipped = tuple(SkippedTensor(t["key"], t["module"], t["reason"], tuple(t["shape"])) for t in doc["not_analysed"])
    return ScoreReport(
        info,
        options,
        doc["device"],
        tuple(sorted(layers, key=rank_key)),
        skipped,
        tool_version=doc["tool_version"],
        parameters=dict(doc["parameters"]),
    )
