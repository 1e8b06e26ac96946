"""Writing a pruned adapter in the input's own format (PEFT, kohya-ss, diffusers, MLX-LM): every file goes into a
temporary directory (or file) beside the destination, which is then renamed into place, so a crash or Ctrl-C
leaves no half-written adapter; the input is only ever read."""

from __future__ import annotations

import enum
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from s3lora_cli.adapters.base import LoraLayer, file_sha256
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.adapters.detect import MLX_WEIGHTS, check_confined, hf_cache_blobs
from s3lora_cli.adapters.diffusers import METADATA_KEY
from s3lora_cli.adapters.peft import BIN_NAME, SAFETENSORS_NAME
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, UsageError

REPORT_NAME = "s3lora-report.json"
"""The score report written beside the pruned adapter."""


class PruneMode(str, enum.Enum):
    """How a pruned layer's update is removed."""

    ZERO = "zero"
    """lora_B (and lora_B.bias) set to zeros: dW = 0, the paper's operation; the file keeps every tensor name."""
    DROP = "drop"
    """All the layer's tensors removed and its module listed in ``exclude_modules``: PEFT does not wrap it."""


@dataclass(frozen=True)
class LayerEdit:
    """One pruned layer and how it is pruned. DoRA layers are always dropped: with lora_B zeroed, their
    magnitude vector would still rescale the base weight."""

    layer: LoraLayer
    mode: PruneMode

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors this edit zeroes (``zero``) or removes (``drop``), by their names in the weights file."""
        if self.mode is PruneMode.ZERO:
            return tuple(self.layer.keys[role] for role in ("B", "B.bias") if role in self.layer.keys)
        return tuple(sorted(self.layer.keys.values()))


@dataclass(frozen=True)
class Layout:
    """How a pruned adapter is written back in its input's format.

    family: "peft", "kohya", "diffusers" or "mlx". single_file: the output is one weights file (a kohya file, a
    diffusers file given as a file) rather than a directory. weights_name: the weights file's name in the output.
    drop: why ``--mode drop`` cannot be written in this format, or None when it can.
    """

    family: str
    single_file: bool
    weights_name: str
    drop: str | None = None


MLX_NO_DROP = ("MLX-LM wraps every module that lora_parameters.keys names in the last num_layers blocks and cannot "
               "leave one layer out, so an MLX adapter cannot drop layers; use --mode zero (MLX DoRA layers cannot "
               "be pruned: with lora_b zeroed their magnitude .m would still rescale the weight)")


def layout_for(adapter_format: str, weights_path: Path, given: Path) -> Layout:
    """The output layout of an adapter of ``adapter_format`` (a reader's ``format``) read from ``weights_path``,
    as the user named it (``given``: a directory or the weights file)."""
    family = adapter_format.split("-")[0]
    if family == "peft":
        return Layout("peft", False, SAFETENSORS_NAME)
    if family == "mlx":
        return Layout("mlx", False, MLX_WEIGHTS, MLX_NO_DROP)
    if family == "kohya" or not given.is_dir():
        return Layout(family, True, weights_path.with_suffix(".safetensors").name)
    return Layout(family, False, weights_path.with_suffix(".safetensors").name)


def default_file_destination(weights_path: Path) -> Path:
    """``<stem>-pruned.safetensors`` beside a single-file adapter."""
    source = Path(os.path.abspath(weights_path))
    return source.with_name(f"{source.stem}-pruned.safetensors")


def check_file_destination(weights_path: Path, destination: Path, force: bool) -> None:
    """For a single-file adapter: refuse a destination that is (or resolves to) the input file, a directory, or
    an existing file without ``force``."""
    target = destination.resolve()
    if target == weights_path.resolve():
        raise UsageError(f"{destination} is the input adapter {weights_path}; the input is never written to: give -o "
                         "another file name")
    parent = destination.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is not a directory, so {destination} cannot be created there")
    if not os.path.lexists(destination):
        return
    if destination.is_dir():
        raise UsageError(f"{destination} is a directory; for a single-file adapter -o names the .safetensors file "
                         "to write")
    if not force:
        raise UsageError(f"{destination} exists; pass --force to replace it")


def adapter_dir(path: Path) -> Path:
    """The directory of an adapter given as a directory or as its weights file."""
    if not path.exists():
        raise AdapterInputError(f"{path}: no such file or directory")
    return path if path.is_dir() else path.parent


def default_destination(source_dir: Path) -> Path:
    """``<parent>/<name>-pruned``: a sibling of the input directory, named after it (``adapter/`` gives
    ``adapter-pruned/``). ``..`` is resolved lexically, symlinks are not: the sibling is of the path as given."""
    source = Path(os.path.abspath(source_dir))
    if hf_cache_blobs(source) is not None:
        raise UsageError(f"{source_dir} is a Hugging Face cache snapshot; s3lora does not write into the cache: "
                         "give -o a path for the pruned adapter")
    return source.parent / f"{source.name}-pruned"


def check_destination(source_dir: Path, destination: Path, force: bool) -> None:
    """Refuse a destination that is, or resolves (through symlinks) to, the input directory or a path inside it;
    one that contains the input; one that exists without ``force``; and, even with ``force``, one that is not a
    directory or is a non-empty directory without adapter_config.json (never replace an arbitrary directory)."""
    source, target = source_dir.resolve(), destination.resolve()
    via = f" (it resolves to {target})" if target != Path(os.path.abspath(destination)) else ""
    if target == source or source in target.parents:
        raise UsageError(f"{destination} is the input adapter {source_dir} or inside it{via}; the input is never "
                         "written to: give -o a path outside it")
    if target in source.parents:
        raise UsageError(f"{destination} contains the input adapter {source_dir}{via}; replacing it would delete the "
                         "input: give -o another path")
    parent = destination.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is not a directory, so {destination} cannot be created there")
    if not os.path.lexists(destination):
        return
    if not force:
        raise UsageError(f"{destination} exists; pass --force to replace it")
    if not destination.is_dir():
        raise UsageError(f"{destination} exists and is not a directory; -o names the directory to write the pruned "
                         "adapter to")
    if any(destination.iterdir()) and not (destination / CONFIG_NAME).is_file():
        raise UsageError(f"{destination} is not empty and holds no {CONFIG_NAME}; even with --force s3lora replaces "
                         "only an adapter directory: give -o a new path")


def merged_exclude_modules(existing: object, modules: Sequence[str]) -> list[str] | str:
    """``exclude_modules`` with ``modules`` added, in the form PEFT reads: a list of names (exact or as a suffix
    after a dot) stays a list; a string is a regular expression PEFT full-matches, so the names join it as
    escaped alternatives."""
    if not existing:
        return sorted(modules)
    if isinstance(existing, str):
        return "|".join([f"(?:{existing})", *(re.escape(m) for m in sorted(modules))])
    if isinstance(existing, list) and all(isinstance(m, str) for m in existing):
        return existing + [m for m in sorted(modules) if m not in existing]
    raise AdapterInputError(f"{CONFIG_NAME}: 'exclude_modules' is {existing!r}; expected a list of names or a string")


def write_pruned_adapter(weights_path: Path, destination: Path, edits: Sequence[LayerEdit], *,
                         metadata: Mapping[str, str], report_text: str, force: bool = False,
                         expected_sha256: str | None = None, layout: Layout | None = None) -> Path:
    """Write the adapter at ``weights_path`` with ``edits`` applied to ``destination`` in the input's format
    (``layout``; default: a PEFT adapter directory), and return ``destination``.

    - the weights (safetensors): every tensor not edited is copied bit for bit (name, dtype, values); the
      safetensors metadata keeps the input's keys and adds ``metadata`` (provenance); PEFT's gets ``format: pt``.
      For a diffusers file whose header holds ``lora_adapter_metadata``, dropped modules join its components'
      ``exclude_modules``.
    - a directory output: adapter_config.json copied byte for byte, unless a PEFT layer is dropped: then the same
      keys, unknown ones included, with the dropped modules added to ``exclude_modules``; every other file and
      folder of the input directory copied; ``report_text`` in s3lora-report.json. A single-file output is the
      weights file alone.
    ``expected_sha256`` (the weights hash the edits were planned on) guards against an input that changed since.
    """
    layout = layout or Layout("peft", False, SAFETENSORS_NAME)
    dropped = [e.layer.module for e in edits if e.mode is PruneMode.DROP]
    if dropped and layout.drop:
        raise UsageError(layout.drop)
    source_dir = weights_path.parent
    if layout.single_file:
        check_file_destination(weights_path, destination, force)
    else:
        check_destination(source_dir, destination, force)
    tensors, old_metadata = _read_weights(weights_path, expected_sha256)
    for edit in edits:
        for name in edit.tensor_names:
            if name not in tensors:
                raise AdapterInputError(f"{weights_path}: tensor {name!r} of {edit.layer.module} is not in the file")
            if edit.mode is PruneMode.ZERO:
                tensors[name] = torch.zeros_like(tensors[name])
            else:
                del tensors[name]
    new_metadata = {**old_metadata, **({"format": "pt"} if layout.family == "peft" else {}), **metadata}
    if dropped and layout.family == "diffusers" and METADATA_KEY in old_metadata:
        new_metadata[METADATA_KEY] = _excluded_in_header(old_metadata[METADATA_KEY], dropped)
    if layout.single_file:
        _write_single_file(tensors, new_metadata, weights_path, destination, force)
        return destination
    config_text = None
    if (source_dir / CONFIG_NAME).is_file():
        check_confined(source_dir / CONFIG_NAME, source_dir)
        config_text = _pruned_config(source_dir / CONFIG_NAME, dropped if layout.family == "peft" else [])
    skip = {weights_path.name, layout.weights_name, SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME, REPORT_NAME}
    if layout.family == "mlx":  # the other training checkpoints are not pruned: leave them out
        skip |= {p.name for p in source_dir.glob(f"*{MLX_WEIGHTS}")}
    parent = destination.absolute().parent
    tmp = parent / f".{destination.name}.{secrets.token_hex(4)}.s3lora-tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _copy_other_files(source_dir, tmp, skip=skip)
        _save_weights(tensors, tmp / layout.weights_name, new_metadata)
        shutil.copymode(weights_path, tmp / layout.weights_name)
        if config_text is not None:
            _write_text(tmp / CONFIG_NAME, config_text)
        _write_text(tmp / REPORT_NAME, report_text)
        _install(tmp, destination, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RuntimeProblem(f"cannot write the pruned adapter to {destination} ({exc}); nothing was written, "
                                 "the input is unchanged") from exc
        raise
    return destination


def _write_single_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], weights_path: Path,
                       destination: Path, force: bool) -> None:
    parent = destination.absolute().parent
    tmp = parent / f".{destination.name}.{secrets.token_hex(4)}.s3lora-tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _save_weights(tensors, tmp, metadata)
        shutil.copymode(weights_path, tmp)
        if os.path.lexists(destination) and not force:  # it appeared while we were writing
            raise UsageError(f"{destination} exists; pass --force to replace it")
        os.replace(tmp, destination)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RuntimeProblem(f"cannot write the pruned adapter to {destination} ({exc}); nothing was written, "
                                 "the input is unchanged") from exc
        raise


def _excluded_in_header(text: str, dropped: Sequence[str]) -> str:
    """diffusers' ``lora_adapter_metadata`` with each dropped module (``<component>.<module>``) added to its
    component's ``exclude_modules``, so that diffusers' loader does not wrap it."""
    flat = json.loads(text)
    by_prefix: dict[str, list[str]] = {}
    for module in dropped:
        prefix, _, inner = module.partition(".")
        by_prefix.setdefault(prefix, []).append(inner)
    for prefix, modules in by_prefix.items():
        if any(str(k).startswith(prefix + ".") for k in flat):
            key = f"{prefix}.exclude_modules"
            flat[key] = merged_exclude_modules(flat.get(key), modules)
    return json.dumps(flat, indent=2, sort_keys=True)


def _read_weights(weights_path: Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the weights file (the file's own bytes, no conversion) and its safetensors metadata."""
    try:
        if weights_path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights_path), framework="pt", device="cpu") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        else:  # adapter_model.bin: plain tensors only; clone so that no two names share storage
            state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
            metadata, tensors = {}, {str(k): v.detach().clone().contiguous() for k, v in state.items()}
    except Exception as exc:
        raise AdapterInputError(f"{weights_path}: cannot be read for pruning ({exc})") from None
    if expected_sha256 is not None and file_sha256(weights_path) != expected_sha256:
        raise AdapterInputError(f"{weights_path} changed while s3lora was reading it; nothing was written, run again")
    return tensors, metadata


def _pruned_config(config_path: Path, dropped: Sequence[str]) -> str:
    text = config_path.read_text(encoding="utf-8")
    if not dropped:
        return text
    raw = json.loads(text)
    raw["exclude_modules"] = merged_exclude_modules(raw.get("exclude_modules"), dropped)
    return json.dumps(raw, indent=2) + "\n"


def _copy_other_files(source_dir: Path, target: Path, skip: set[str]) -> None:
    """Copy README, tokenizer files, training arguments, ... (symlinks followed: the copy holds the content; a
    symlink leading outside the adapter directory is refused, except a cache snapshot's links into its blobs)."""
    for entry in sorted(source_dir.iterdir()):
        if entry.name in skip or entry.name.endswith((".s3lora-tmp", ".s3lora-old")):
            continue
        check_confined(entry, source_dir)
        if entry.is_dir():
            for inner in entry.rglob("*"):
                check_confined(inner, source_dir)
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, symlinks=False)
        elif entry.is_file():
            shutil.copy2(entry, target / entry.name)


def _save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _install(tmp: Path, destination: Path, force: bool) -> None:
    """Rename the finished directory into place. An existing destination (``force``) is first renamed aside and
    restored if the second rename fails, so at every moment the destination is either the old or the new one."""
    if not os.path.lexists(destination):
        os.rename(tmp, destination)
        return
    if not force:  # it appeared while we were writing
        raise UsageError(f"{destination} exists; pass --force to replace it")
    old = destination.absolute().parent / f".{destination.name}.{secrets.token_hex(4)}.s3lora-old"
    os.rename(destination, old)
    try:
        os.rename(tmp, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed into place: a reader sees the old
    file or the whole new one, never part of it."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
