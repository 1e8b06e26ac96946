"""The gate in front of the LoRA store: a trained adapter is scored with s3lora's engine, its sharpest layers
pruned, the pruned adapter evaluated on its cluster's validation split, and admitted with ``admit``'s machinery
(the same gate rules, quarantine, audit log and lock), its directory holding the record of the cluster it
serves; below the exact-match floor it is quarantined with that reason."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3lora_cli.adapt.policy import StorePolicy
from s3lora_cli.adapt.train import Example, TrainSettings, Validation, attached, validate
from s3lora_cli.gate import GatePolicy
from s3lora_cli.selection import Selection

CLUSTER_RECORD_NAME = "s3lora-cluster.json"
"""The file in an adapter's directory that says which cluster it serves (see ``cluster_record``)."""

PRUNE_REPORT_SOURCE = "s3lora-report.json"
PRUNE_REPORT_NAME = "s3lora-prune.json"
"""Where the pruned adapter's report (``s3lora prune``'s, written as s3lora-report.json) is kept in the entry."""

RECORD_VERSION = 1
DEFAULT_SELECTION = Selection.of()
"""The paper's top-10 by SSI."""

DEFAULT_MAX_SSI = 0.9
"""The gate's rule when neither a flag nor a policy gives one: no layer left after pruning may be nearly rank-one
sharp. Measured on the demo's adapters (SmolLM2-135M, r 8 on q, k, v: 90 layers), the top SSI was 0.89 and,
once the top 10 were pruned, the highest left was 0.62-0.69: ``check``'s example 0.6 refused every one."""


@dataclass(frozen=True)
class GateSettings:
    """How a trained adapter is gated. selection: which layers are pruned (as ``s3lora prune`` takes them);
    floor: least pruned validation exact match; policy: the gate's rules (as ``s3lora admit`` takes them);
    device: where SSI is computed."""

    selection: Selection = DEFAULT_SELECTION
    floor: float = StorePolicy.floor
    policy: GatePolicy = field(default_factory=lambda: GatePolicy(max_ssi=DEFAULT_MAX_SSI))
    device: str = "cpu"


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did with one adapter: the layers pruned (rank order), validation before and after pruning,
    the refusal reason (None when the pruned score reached the floor), admit's result, and seconds spent
    scoring and pruning, evaluating, and admitting."""

    pruned_layers: tuple[str, ...]
    scored_layers: int
    before: Validation
    after: Validation
    refusal: str | None
    admit: Any
    seconds: Mapping[str, float]

    @property
    def admitted(self) -> bool:
        return bool(self.admit.admitted)


Vector = Sequence[float] | np.ndarray
"""A vector of the embedding space: a list read from JSON or an array of the buffer."""


def cluster_record(
    *,
    run: str,
    cluster: int,
    generation: int,
    bucket: str,
    keywords: Sequence[str],
    members: int,
    centre: Vector | None,
    prompt_centre: Vector | None,
    origin: Vector | None,
    embedder: str,
    base_model: str,
    train: Mapping[str, Any] | None = None,
    base_centre: Vector | None = None,
) -> dict[str, Any]:
    """The cluster an adapter serves. run: the id of the state directory that found it; cluster: its id there;
    generation: 1, then one more per refresh; centre: the buffer's centre (of prompt + answer vectors, centred on
    ``origin``); prompt_centre: the unit mean of its members' prompt vectors centred on ``origin``, which routing
    compares a new prompt with; base_centre: the same of the prompts the base model answered (None when none
    were seen), which a prompt must be farther from. The gate adds the validation scores and the pruned layers."""
    return {
        "schema_version": RECORD_VERSION,
        "run": run,
        "cluster": cluster,
        "generation": generation,
        "bucket": bucket,
        "keywords": list(keywords),
        "members": members,
        "centre": None if centre is None else [float(x) for x in centre],
        "prompt_centre": None if prompt_centre is None else [float(x) for x in prompt_centre],
        "origin": None if origin is None else [float(x) for x in origin],
        "base_centre": None if base_centre is None else [float(x) for x in base_centre],
        "embedder": embedder,
        "base_model": base_model,
        "train": dict(train or {}),
    }


def _validation_json(v: Validation) -> dict[str, float]:
    return {"exact_match": v.exact_match, "loss": v.loss}


def load_adapter_model(base_model: Any, adapter_dir: Path) -> AbstractContextManager[Any]:
    """For a ``with`` block: a PEFT model of ``adapter_dir`` attached to ``base_model``, which is as it was
    afterwards."""
    from s3lora_cli.evaluation.variants import load_peft_model

    return attached(base_model, lambda model: load_peft_model(model, Path(adapter_dir), Path(str(adapter_dir))))


def gate_adapter(
    base_model: Any,
    tokenizer: Any,
    adapter_dir: Path,
    validation: Sequence[Example],
    before: Validation,
    record: Mapping[str, Any],
    store: Path,
    work: Path,
    name: str,
    settings: GateSettings,
    train_settings: TrainSettings,
    quarantine: Path | None = None,
    audit_log: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> GateOutcome:
    """Score ``adapter_dir`` (read-only), write its pruned copy to ``work/pruned``, evaluate that on
    ``validation``, write ``record`` (with the validation scores before and after pruning) beside it, and admit
    it into ``store`` as ``<name>-<key>``: refused into the quarantine when the gate's rules fail it or when its
    exact match is below ``settings.floor`` (the first reason in its record)."""
    from s3lora_cli import report
    from s3lora_cli.pruning import PruneMode, prune_adapter
    from s3lora_cli.scoring import ScoreOptions, layer_memo
    from s3lora_cli.store import admit_adapter

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    pruned_dir = Path(work) / "pruned"
    if pruned_dir.exists():
        shutil.rmtree(pruned_dir)
    with layer_memo():  # admit scores the pruned copy: its unpruned layers are the same tensors
        result = prune_adapter(
            adapter_dir,
            pruned_dir,
            settings.selection,
            PruneMode.ZERO,
            ScoreOptions(device=settings.device),
            force=True,
        )
        seconds["prune"] = time.perf_counter() - start
        start = time.perf_counter()
        with load_adapter_model(base_model, pruned_dir) as model:
            after = validate(model, tokenizer, validation, train_settings, progress)
        seconds["evaluate"] = time.perf_counter() - start
        refusal = None
        if after.exact_match < settings.floor:
            refusal = (
                f"pruned validation exact match {after.exact_match:.3f} is below the floor {settings.floor:g} "
                f"(before pruning {before.exact_match:.3f})"
            )
        doc = dict(record)
        doc.update(
            validation={
                "samples": len(validation),
                "before_pruning": _validation_json(before),
                "after_pruning": _validation_json(after),
                "floor": settings.floor,
            },
            pruning={
                "selection": settings.selection.as_dict(),
                "layers": list(result.modules),
                "scored_layers": sum(s.ssi is not None for s in result.report.layers),
            },
        )
        # prune's report keeps its own name: the quarantine writes the gate's report as s3lora-report.json
        (pruned_dir / PRUNE_REPORT_SOURCE).rename(pruned_dir / PRUNE_REPORT_NAME)
        (pruned_dir / CLUSTER_RECORD_NAME).write_text(
            json.dumps(doc, allow_nan=False, indent=1) + "\n", encoding="utf-8"
        )
        start = time.perf_counter()
        admitted = admit_adapter(
            pruned_dir,
            store,
            settings.policy,
            device=settings.device,
            name=name,
            quarantine=quarantine,
            audit_log=audit_log,
            refusal=refusal,
            report_json=lambda gate: report.render_json(report.check_dict((gate,))),
        )
        seconds["admit"] = time.perf_counter() - start
    return GateOutcome(result.modules, doc["pruning"]["scored_layers"], before, after, refusal, admitted, seconds)
