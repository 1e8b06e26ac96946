"""The variants ``s3lora eval`` compares and how each is applied to one PEFT model: the base (every LoRA layer
off), the full adapter, the adapter pruned on the fly (the layers ``s3lora prune`` would remove, switched off),
a pruned adapter loaded from disk, and the points of a tau sweep; also the check that the base model can carry
the adapter, made before anything runs."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3lora_cli.adapters import Adapter, LoraLayer, open_adapter
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, UsageError
from s3lora_cli.scoring import ScoreReport
from s3lora_cli.selection import Selection, select_layers

ADAPTER_NAME = "default"
PRUNED_FILE_NAME = "pruned"
"""The PEFT adapter names of the adapter under evaluation and of a pruned adapter given with --pruned."""

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class VariantKind(str, enum.Enum):
    BASE = "base"
    ADAPTER = "adapter"
    PRUNED = "pruned"  # pruned on the fly: the selected layers' LoRA switched off
    PRUNED_FILE = "pruned-file"  # a pruned adapter read from disk (--pruned)


@dataclass(frozen=True)
class Variant:
    """One model to evaluate. ``pruned``: the modules whose LoRA update is removed (kind PRUNED), in rank order;
    ``tau``: the sweep point or the --tau it came from (None otherwise); ``selection``: how they were chosen."""

    name: str
    kind: VariantKind
    pruned: tuple[str, ...] = ()
    tau: int | None = None
    selection: str | None = None

    @property
    def same_model_as(self) -> tuple:
        """Variants with equal keys compute the same function (tau = 0 is the adapter itself)."""
        if self.kind is VariantKind.PRUNED and not self.pruned:
            return (VariantKind.ADAPTER, frozenset())
        return (self.kind, frozenset(self.pruned))


def plan_variants(
    report: ScoreReport | None, selection: Selection | None, sweep: Sequence[int] = (), pruned_file: Path | None = None
) -> tuple[Variant, ...]:
    """base, adapter, then the pruned adapter (``selection`` applied to ``report`` with ``selection.select_layers``,
    exactly as ``s3lora prune`` selects; or ``pruned_file``), then one variant per sweep point (the top-tau
    layers by SSI)."""
    variants = [Variant("base", VariantKind.BASE), Variant("adapter", VariantKind.ADAPTER)]
    if pruned_file is not None:
        variants.append(Variant("pruned", VariantKind.PRUNED_FILE, selection=str(pruned_file)))
    elif selection is not None:
        assert report is not None  # scored whenever a selection or a sweep needs it
        chosen = tuple(s.module for s in select_layers(report, selection))
        variants.append(Variant("pruned", VariantKind.PRUNED, chosen, selection.tau, selection.describe()))
    for tau in sweep:  # a curve over how much is cut: large selections are its point, and 0 is the adapter
        if tau == 0:
            variants.append(Variant("tau=0", VariantKind.PRUNED, (), 0, "tau 0 (nothing pruned)"))
            continue
        sweep_selection = Selection(tau=tau, allow_large=True)
        assert report is not None
        chosen = tuple(s.module for s in select_layers(report, sweep_selection))
        variants.append(Variant(f"tau={tau}", VariantKind.PRUNED, chosen, tau, sweep_selection.describe()))
    return tuple(variants)


def parse_sweep(text: str) -> tuple[int, ...]:
    """ "0,2,4,10" -> (0, 2, 4, 10): distinct non-negative integers in the order given."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UsageError(f"--sweep-tau {text!r}: expected comma-separated integers of 0 or more, like 0,2,4,10")
        if int(part) not in values:
            values.append(int(part))
    return tuple(values)


def peft_directory(path: Path, adapter_name: str | None) -> tuple[Path, Adapter]:
    """The directory PEFT loads the adapter at ``path`` from, and the adapter as s3lora reads it (still open:
    close it). Only PEFT adapters: PEFT cannot load the others onto a causal LM as they are."""
    adapter = open_adapter(path, None, adapter_name)
    try:
        if not adapter.format.startswith("peft"):
            raise AdapterInputError(
                f"{path}: a {adapter.format} adapter; eval loads adapters with PEFT, which reads PEFT's own layout "
                "only (kohya-ss and diffusers files are for diffusion models; convert an MLX-LM adapter to PEFT)"
            )
        if adapter.weights_path.name not in PEFT_WEIGHTS:
            raise AdapterInputError(
                f"{adapter.weights_path}: PEFT loads only {' or '.join(PEFT_WEIGHTS)}; rename it or give the directory"
            )
    except BaseException:
        adapter.close()
        raise
    return adapter.weights_path.parent, adapter


def module_shape(module: Any) -> tuple[int, int] | None:
    """(d, k) of a LoRA update on ``module`` in s3lora's orientation, or None when PEFT's LoRA cannot wrap it:
    Linear [out, in]; transformers' Conv1D (weight stored [in, out]) [out, in]; Embedding [num, dim];
    ConvNd [out, in * prod(kernel)]."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return None


def check_base_matches(model: Any, layers: Sequence[LoraLayer], base: Path, adapter: Path) -> None:
    """Refuse (AdapterInputError) a base model that lacks a module the adapter adapts, or whose module has
    another shape or a type PEFT's LoRA cannot wrap; the message names the first such module and counts them."""
    problems = []
    for layer in layers:
        try:
            module = model.get_submodule(layer.module)
        except AttributeError:
            problems.append(f"{layer.module} is not a module of the base model")
            continue
        shape = module_shape(module)
        if shape is None:
            problems.append(f"{layer.module} is a {type(module).__name__} in the base model, which LoRA cannot wrap")
        elif shape != tuple(layer.shape):
            problems.append(
                f"{layer.module} is {shape[0]} x {shape[1]} in the base model but "
                f"{layer.shape[0]} x {layer.shape[1]} in the adapter"
            )
    if problems:
        more = f" (and {len(problems) - 1} more of the adapter's {len(layers)} layers)" if len(problems) > 1 else ""
        raise AdapterInputError(
            f"the adapter {adapter} does not fit the base model {base}: {problems[0]}{more}; "
            "give the base model the adapter was trained on"
        )


EVAL_EXTRA_HINT = "install the eval extra: pip install 's3lora[eval]'"


def require_libraries(*names: str) -> None:
    """RuntimeProblem (exit 4) naming the first of ``names`` that cannot be imported, with how to install it."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise RuntimeProblem(f"{name} is not installed: {EVAL_EXTRA_HINT}")


def load_peft_model(model: Any, adapter_dir: Path, base: Path, pruned_dir: Path | None = None) -> Any:
    """Wrap ``model`` with the adapter (PEFT adapter name ``default``) and, when given, the pruned adapter
    (``pruned``); PEFT's refusals become AdapterInputError."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER_NAME, is_trainable=False)
        if pruned_dir is not None:
            peft_model.load_adapter(str(pruned_dir), adapter_name=PRUNED_FILE_NAME, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterInputError(f"PEFT cannot load the adapter onto the base model {base}: {first}") from exc
    peft_model.set_adapter(ADAPTER_NAME)
    peft_model.eval()
    return peft_model


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """PEFT's LoRA layers of ``peft_model`` by s3lora's module name (no ``base_model.model.`` prefix)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    inner = peft_model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, PeftLoraLayer)}


@contextmanager
def applied(peft_model: Any, variant: Variant) -> Iterator[None]:
    """Run the block with ``variant`` in effect on ``peft_model``, and restore the full adapter afterwards.

    base: PEFT's ``disable_adapter()`` (every LoRA layer computes its base layer alone). pruned: the pruned
    modules' LoRA layers disabled (``enable_adapters(False)``): their output is the base layer's, which is what
    ``s3lora prune`` writes (lora_B zeroed adds exactly 0; a dropped layer is not wrapped). pruned-file: PEFT's
    ``set_adapter`` to the adapter loaded from disk."""
    if variant.kind is VariantKind.BASE:
        with peft_model.disable_adapter():
            yield
        return
    if variant.kind is VariantKind.PRUNED_FILE:
        peft_model.set_adapter(PRUNED_FILE_NAME)
        try:
            yield
        finally:
            peft_model.set_adapter(ADAPTER_NAME)
        return
    layers = lora_layers(peft_model) if variant.pruned else {}
    missing = [m for m in variant.pruned if m not in layers]
    if missing:
        raise AdapterInputError(f"{missing[0]}: selected for pruning but not a LoRA layer of the loaded model")
    off = [layers[m] for m in variant.pruned]
    for layer in off:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in off:
            layer.enable_adapters(True)
