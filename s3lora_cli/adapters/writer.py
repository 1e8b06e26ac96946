"""Writing a pruned PEFT adapter: every file goes into a temporary directory beside the destination, which is
then renamed into place, so a crash or Ctrl-C leaves no half-written adapter; the input is only ever read."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from s3lora_cli.adapters.base import LoraLayer
from s3lora_cli.adapters.config import CONFIG_NAME
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


def adapter_dir(path: Path) -> Path:
    """The directory of an adapter given as a directory or as its weights file."""
    if not path.exists():
        raise AdapterInputError(f"{path}: no such file or directory")
    return path if path.is_dir() else path.parent


def default_destination(source_dir: Path) -> Path:
    """``<parent>/<name>-pruned``: a sibling of the input directory, named after it (``adapter/`` gives
    ``adapter-pruned/``). ``..`` is resolved lexically, symlinks are not: the sibling is of the path as given."""
    source = Path(os.path.abspath(source_dir))
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
                         expected_sha256: str | None = None) -> Path:
    """Write the adapter at ``weights_path`` (safetensors or PEFT's .bin) with ``edits`` applied to
    ``destination`` as a complete PEFT adapter directory, and return ``destination``.

    - adapter_model.safetensors: every tensor not edited is copied bit for bit (name, dtype, values); the
      safetensors metadata keeps the input's keys, sets ``format: pt`` and adds ``metadata`` (provenance).
    - adapter_config.json: copied byte for byte, unless a layer is dropped: then the same keys, unknown ones
      included, with the dropped modules added to ``exclude_modules``.
    - every other file and folder of the input directory is copied; ``report_text`` goes to s3lora-report.json.
    ``expected_sha256`` (the weights hash the edits were planned on) guards against an input that changed since.
    """
    source_dir = weights_path.parent
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
    config_text = _pruned_config(source_dir / CONFIG_NAME, [e.layer.module for e in edits if e.mode is PruneMode.DROP])
    parent = destination.absolute().parent
    tmp = parent / f".{destination.name}.{secrets.token_hex(4)}.s3lora-tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _copy_other_files(source_dir, tmp, skip={weights_path.name, SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME,
                                                 REPORT_NAME})
        _save_weights(tensors, tmp / SAFETENSORS_NAME, {**old_metadata, "format": "pt", **metadata})
        shutil.copymode(weights_path, tmp / SAFETENSORS_NAME)
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
    if expected_sha256 is not None and _sha256(weights_path) != expected_sha256:
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
    """Copy README, tokenizer files, training arguments, ... (symlinks followed: the copy holds the content)."""
    for entry in sorted(source_dir.iterdir()):
        if entry.name in skip:
            continue
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
