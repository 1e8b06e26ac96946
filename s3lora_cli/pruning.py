"""Pruning an adapter (paper Eq. 5): score it, select layers by SSI, and write the adapter with their LoRA
updates removed; returns what it did and never prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from s3lora_cli._version import __version__
from s3lora_cli.adapters import LoraLayer, open_adapter
from s3lora_cli.adapters.writer import (
    LayerEdit,
    Layout,
    PruneMode,
    check_destination,
    check_file_destination,
    default_destination,
    default_file_destination,
    layout_for,
    write_pruned_adapter,
)
from s3lora_cli.document import PRUNED, render_json, report_dict
from s3lora_cli.durable import clean_stale
from s3lora_cli.errors import UsageError
from s3lora_cli.scoring import LayerScore, ScoreOptions, ScoreReport, score_adapter
from s3lora_cli.selection import Selection, select_layers

__all__ = ["PruneMode", "PruneResult", "PrunedLayer", "prune_adapter", "prune_document"]

DORA_NOTE = "DoRA layer: dropped, not zeroed (with lora_B zeroed its magnitude vector would still rescale the weight)"


@dataclass(frozen=True)
class PrunedLayer:
    """One pruned layer: its score, the action taken (``zero`` or ``drop``), the tensors zeroed or removed,
    and a note when the action differs from the mode asked for (DoRA)."""

    score: LayerScore
    action: PruneMode
    tensors: tuple[str, ...]
    note: str | None = None

    @property
    def module(self) -> str:
        return self.score.module


@dataclass(frozen=True)
class PruneResult:
    """What ``prune_adapter`` did. ``output`` is where the pruned adapter is (or, with ``written`` False after a
    dry run, would be) written; ``pruned`` is in rank order (SSI descending, then module name)."""

    report: ScoreReport
    selection: Selection
    mode: PruneMode
    pruned: tuple[PrunedLayer, ...]
    output: Path
    written: bool

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(p.module for p in self.pruned)


def prune_adapter(
    path: str | Path,
    output: str | Path | None = None,
    selection: Selection | None = None,
    mode: PruneMode = PruneMode.ZERO,
    options: ScoreOptions | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int, LoraLayer], None] | None = None,
) -> PruneResult:
    """Score the adapter at ``path``, select layers with ``selection`` (default: the top-10 by SSI) and write
    the pruned adapter to ``output`` in the input's format (default: the sibling directory ``<adapter>-pruned``,
    or ``<name>-pruned.safetensors`` beside a single-file kohya / diffusers adapter).

    ``mode`` zero sets the pruned layers' lora_B (lora_up, lora_b) to zeros (paper Eq. 5: their dW becomes 0);
    drop removes their tensors (PEFT: and lists them in ``exclude_modules``; MLX-LM cannot drop). DoRA layers are
    dropped in either mode. With ``dry_run`` nothing is written; the destination is still checked, so a dry run
    fails where the real run would. ``options.input_format`` and ``options.adapter_name`` choose what is read.
    """
    path = Path(path)
    selection = selection or Selection.of()
    options = options or ScoreOptions()
    layout, weights_path = _layout(path, options)
    if layout.single_file:
        destination = Path(output) if output is not None else default_file_destination(weights_path)
    else:
        destination = Path(output) if output is not None else default_destination(weights_path.parent)
    if not dry_run:  # what a killed run left there goes first: a half-done --force swap gets its old output back
        clean_stale(destination.absolute().parent)
    if layout.single_file:
        check_file_destination(weights_path, destination, force)
    else:
        check_destination(weights_path.parent, destination, force)
    scores = score_adapter(path, options, progress=progress)
    pruned = tuple(_plan(score, mode) for score in select_layers(scores, selection))
    dropped = sum(p.action is PruneMode.DROP for p in pruned)
    if dropped and layout.drop:
        raise UsageError(layout.drop)
    if dropped and dropped == len(scores.layers):
        raise UsageError(
            f"this would drop all {dropped} LoRA layers, and PEFT refuses to load an adapter whose "
            "modules are all excluded; use --mode zero (DoRA layers are always dropped) or prune fewer"
        )
    result = PruneResult(scores, selection, mode, pruned, destination, written=not dry_run)
    if not dry_run:
        edits = [LayerEdit(p.score.layer, p.action) for p in pruned]
        write_pruned_adapter(
            Path(scores.adapter.weights_file),
            destination,
            edits,
            metadata=provenance(result),
            report_text=render_json(prune_document(result)),
            force=force,
            expected_sha256=scores.adapter.sha256,
            layout=layout,
        )
    return result


def _layout(path: Path, options: ScoreOptions) -> tuple[Layout, Path]:
    """How the adapter at ``path`` is written back, and its weights file (reading only its header)."""
    with closing(open_adapter(path, options.input_format, options.adapter_name)) as adapter:
        return layout_for(adapter.format, adapter.weights_path, path), adapter.weights_path


def _plan(score: LayerScore, mode: PruneMode) -> PrunedLayer:
    dora = "magnitude" in score.layer.keys
    action = PruneMode.DROP if dora else mode
    return PrunedLayer(
        score,
        action,
        LayerEdit(score.layer, action).tensor_names,
        DORA_NOTE if dora and mode is PruneMode.ZERO else None,
    )


def _pruned_entries(result: PruneResult) -> list[dict[str, Any]]:
    ranks = {s.module: i for i, s in enumerate(result.report.layers, start=1)}
    return [
        {
            "module": p.module,
            "rank": ranks[p.module],
            "ssi": round(cast(float, p.score.ssi), 10),
            "action": p.action.value,
            "tensors": list(p.tensors),
            "note": p.note,
        }
        for p in result.pruned
    ]


def prune_document(result: PruneResult) -> dict[str, Any]:
    """The score report's JSON document (``document.report_dict``, pruned layers marked ``pruned``) plus
    ``prune`` (mode, selection, output, whether it was written) and ``pruned``: one entry per pruned layer, in
    rank order."""
    doc = report_dict(result.report, set(result.modules), result.selection.tau, mark=PRUNED)
    doc["parameters"].update(result.selection.as_dict(), mode=result.mode.value)
    doc["prune"] = {
        "mode": result.mode.value,
        "selection": result.selection.as_dict(),
        "output": str(result.output),
        "written": result.written,
    }
    doc["pruned"] = _pruned_entries(result)
    return doc


def provenance(result: PruneResult) -> dict[str, str]:
    """The safetensors metadata s3lora adds to a pruned adapter (values are strings, JSON where structured)."""
    compact: dict[str, Any] = {"separators": (",", ":"), "allow_nan": False}
    parameters = {**result.report.parameters, **result.selection.as_dict(), "mode": result.mode.value}
    return {
        "s3lora.version": __version__,
        "s3lora.method": result.report.parameters["method"],
        "s3lora.parameters": json.dumps(parameters, **compact),
        "s3lora.pruned": json.dumps(
            [{k: e[k] for k in ("module", "ssi", "action")} for e in _pruned_entries(result)], **compact
        ),
        "s3lora.source_sha256": result.report.adapter.sha256,
    }
