"""Writing a pruned adapter in the input's own format (PEFT, kohya-ss, diffusers, MLX-LM): every file goes into a
temporary directory (or file) beside the destination, which is then renamed into place, so a crash or Ctrl-C
leaves no half-written adapter; the input is only ever read."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from s3lora_cli.adapters.base import LoraLayer, file_sha256
from s3lora_cli.adapters.config import CONFIG_NAME
from s3lora_cli.adapters.detect import MLX_WEIGHTS, check_confined, hf_cache_blobs
from s3lora_cli.adapters.diffusers import METADATA_KEY
from s3lora_cli.adapters.files import copy_planned, plan_copy
from s3lora_cli.adapters.peft import BIN_NAME, SAFETENSORS_NAME
from s3lora_cli.adapters.safetensors_io import TensorEntry, open_regular, read_safetensors_header
from s3lora_cli.durable import (
    deferred_signals,
    discard,
    install_dir,
    make_temp_dir,
    write_file_atomic,
    write_text_atomic,
)
from s3lora_cli.errors import AdapterInputError, RuntimeProblem, UsageError, describe_os_error

REPORT_NAME = "s3lora-report.json"
"""The score report written beside the pruned adapter."""
BLOCK_BYTES = 8 << 20
"""The weights are copied in blocks of this size: the memory a prune needs does not grow with the file."""

__all__ = ["LayerEdit", "Layout", "PruneMode", "WeightsSource", "write_pruned_adapter", "write_text_atomic"]


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


MLX_NO_DROP = (
    "MLX-LM wraps every module that lora_parameters.keys names in the last num_layers blocks and cannot "
    "leave one layer out, so an MLX adapter cannot drop layers; use --mode zero (MLX DoRA layers cannot "
    "be pruned: with lora_b zeroed their magnitude .m would still rescale the weight)"
)


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
        raise UsageError(
            f"{destination} is the input adapter {weights_path}; the input is never written to: give -o "
            "another file name"
        )
    parent = destination.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is not a directory, so {destination} cannot be created there")
    if not os.path.lexists(destination):
        return
    if destination.is_dir():
        raise UsageError(
            f"{destination} is a directory; for a single-file adapter -o names the .safetensors file to write"
        )
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
        raise UsageError(
            f"{source_dir} is a Hugging Face cache snapshot; s3lora does not write into the cache: "
            "give -o a path for the pruned adapter"
        )
    return source.parent / f"{source.name}-pruned"


def check_destination(source_dir: Path, destination: Path, force: bool) -> None:
    """Refuse a destination that is, or resolves (through symlinks) to, the input directory or a path inside it;
    one that contains the input; one that exists without ``force``; and, even with ``force``, one that is not a
    directory or is a non-empty directory without adapter_config.json (never replace an arbitrary directory)."""
    source, target = source_dir.resolve(), destination.resolve()
    via = f" (it resolves to {target})" if target != Path(os.path.abspath(destination)) else ""
    if target == source or source in target.parents:
        raise UsageError(
            f"{destination} is the input adapter {source_dir} or inside it{via}; the input is never "
            "written to: give -o a path outside it"
        )
    if target in source.parents:
        raise UsageError(
            f"{destination} contains the input adapter {source_dir}{via}; replacing it would delete the "
            "input: give -o another path"
        )
    parent = destination.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is not a directory, so {destination} cannot be created there")
    if not os.path.lexists(destination):
        return
    if not force:
        raise UsageError(f"{destination} exists; pass --force to replace it")
    if not destination.is_dir():
        raise UsageError(
            f"{destination} exists and is not a directory; -o names the directory to write the pruned adapter to"
        )
    if any(destination.iterdir()) and not (destination / CONFIG_NAME).is_file():
        raise UsageError(
            f"{destination} is not empty and holds no {CONFIG_NAME}; even with --force s3lora replaces "
            "only an adapter directory: give -o a new path"
        )


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


def write_pruned_adapter(
    weights_path: Path,
    destination: Path,
    edits: Sequence[LayerEdit],
    *,
    metadata: Mapping[str, str],
    report_text: str,
    force: bool = False,
    expected_sha256: str | None = None,
    layout: Layout | None = None,
) -> Path:
    """Write the adapter at ``weights_path`` with ``edits`` applied to ``destination`` in the input's format
    (``layout``; default: a PEFT adapter directory), and return ``destination``.

    - the weights (safetensors), streamed one block at a time (memory does not grow with the file): every
      tensor not edited is copied bit for bit (name, dtype, bytes); the safetensors metadata keeps the input's
      keys and adds ``metadata`` (provenance); PEFT's gets ``format: pt``. For a diffusers file whose header holds
      ``lora_adapter_metadata``, dropped modules join its components' ``exclude_modules``.
    - a directory output: adapter_config.json copied byte for byte, unless a PEFT layer is dropped: then the same
      keys, unknown ones included, with the dropped modules added to ``exclude_modules``; the other files of the
      input directory copied (``files.plan_copy``: regular files inside it, bounded); ``report_text`` in
      s3lora-report.json. A single-file output is the weights file alone.
    Everything is written beside the destination and renamed into place (``durable``). ``expected_sha256`` (the
    weights hash the edits were planned on) guards against an input that changed since.
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
    source = WeightsSource.open(weights_path, edits)
    old_metadata = source.metadata
    new_metadata = {**old_metadata, **({"format": "pt"} if layout.family == "peft" else {}), **metadata}
    if dropped and layout.family == "diffusers" and METADATA_KEY in old_metadata:
        new_metadata[METADATA_KEY] = _excluded_in_header(old_metadata[METADATA_KEY], dropped)
    mode = stat.S_IMODE(os.stat(weights_path).st_mode)
    write = functools.partial(source.write, metadata=new_metadata, expected_sha256=expected_sha256)
    if layout.single_file:
        _write_file(destination, write, mode, force)
    else:
        _write_directory(weights_path, destination, layout, dropped, write, mode, report_text, force)
    return destination


def _write_file(destination: Path, write: Callable[[BinaryIO], object], mode: int, force: bool) -> None:
    """A single-file output: the weights file alone, written atomically."""
    try:
        destination.absolute().parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(destination, write, replace=force, mode=mode)
    except FileExistsError:  # it appeared while we were writing
        raise UsageError(f"{destination} exists; pass --force to replace it") from None
    except OSError as exc:
        raise _not_written(destination, exc) from None


def _write_directory(
    weights_path: Path,
    destination: Path,
    layout: Layout,
    dropped: list[str],
    write: Callable[[BinaryIO], object],
    mode: int,
    report_text: str,
    force: bool,
) -> None:
    """A directory output: the weights, the config (with ``dropped`` excluded, for PEFT), the input directory's
    other files and the report, made in a temporary directory beside ``destination`` and renamed into place."""
    source_dir = weights_path.parent
    config_text = None
    if (source_dir / CONFIG_NAME).is_file():
        check_confined(source_dir / CONFIG_NAME, source_dir)
        config_text = _pruned_config(source_dir / CONFIG_NAME, dropped if layout.family == "peft" else [])
    skip = {weights_path.name, layout.weights_name, SAFETENSORS_NAME, BIN_NAME, CONFIG_NAME, REPORT_NAME}
    if layout.family == "mlx":  # the other training checkpoints are not pruned: leave them out
        skip |= {p.name for p in source_dir.glob(f"*{MLX_WEIGHTS}")}
    others = plan_copy(source_dir, skip=skip)
    parent = destination.absolute().parent
    tmp = replaced = None
    committed = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with deferred_signals():  # no interruption between making it and knowing it
            tmp = make_temp_dir(parent, destination.name)
        copy_planned(others, tmp)
        with open(tmp / layout.weights_name, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp / layout.weights_name, mode)
        if config_text is not None:
            _write_text(tmp / CONFIG_NAME, config_text)
        _write_text(tmp / REPORT_NAME, report_text)
        with deferred_signals():
            replaced = install_dir(tmp, destination, replace=force)
            tmp, committed = None, True
        discard(replaced)
    except BaseException as exc:
        discard(tmp)
        if committed and isinstance(exc, KeyboardInterrupt):
            raise type(exc)(f"interrupted after the pruned adapter {destination} was written in full") from None
        if isinstance(exc, FileExistsError):  # it appeared while we were writing
            raise UsageError(f"{destination} exists; pass --force to replace it") from None
        if isinstance(exc, OSError):
            raise _not_written(destination, exc) from None
        raise


def _not_written(destination: Path, exc: OSError) -> RuntimeProblem:
    return RuntimeProblem(
        f"cannot write the pruned adapter to {destination}: {describe_os_error(exc)}; nothing "
        "was written, the input is unchanged"
    )


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


@dataclass(frozen=True)
class WeightsSource:
    """The input weights file and the plan of the pruned one: which tensors are copied, zeroed or left out.

    entries: every tensor of the input, (name, entry) in the order of its bytes in the file; zero / drop: the
    names the edits zero and remove; metadata: the input's safetensors metadata ({} for a .bin)."""

    path: Path
    entries: tuple[tuple[str, TensorEntry], ...]
    data_start: int
    zero: frozenset[str]
    drop: frozenset[str]
    metadata: dict[str, str]

    @classmethod
    def open(cls, path: Path, edits: Sequence[LayerEdit]) -> WeightsSource:
        """Read (only) the header of ``path`` and check that every tensor the edits name is in it."""
        if path.suffix == ".safetensors":
            header = read_safetensors_header(path)
            entries = tuple(sorted(header.tensors.items(), key=lambda kv: kv[1].begin))
            data_start, metadata = header.data_start, header.metadata
        else:
            entries, data_start, metadata = (), 0, {}
        names = {name for name, _ in entries} if entries or path.suffix == ".safetensors" else None
        zero: set[str] = set()
        drop: set[str] = set()
        for edit in edits:
            for name in edit.tensor_names:
                if names is not None and name not in names:
                    raise AdapterInputError(f"{path}: tensor {name!r} of {edit.layer.module} is not in the file")
                (zero if edit.mode is PruneMode.ZERO else drop).add(name)
        return cls(path, entries, data_start, frozenset(zero), frozenset(drop), dict(metadata))

    def write(self, fh: BinaryIO, *, metadata: Mapping[str, str], expected_sha256: str | None) -> None:
        """Write the pruned safetensors file to ``fh``: the header, then each kept tensor's bytes (copied, or
        zeros for a zeroed one) in the input's order, one block at a time. The input's bytes are hashed as
        they are read, so an input that changed since it was scored (``expected_sha256``) is refused."""
        if self.path.suffix != ".safetensors":
            self._write_from_pickle(fh, metadata, expected_sha256)
            return
        kept = [(name, e) for name, e in self.entries if name not in self.drop]
        _write_header(fh, [(name, e.dtype, e.shape, e.end - e.begin) for name, e in kept], metadata)
        digest = hashlib.sha256()
        try:
            with open_regular(self.path) as src:
                head = src.read(self.data_start)
                digest.update(head)
                for name, e in self.entries:
                    left = e.end - e.begin
                    while left:
                        block = src.read(min(left, BLOCK_BYTES))
                        if not block:
                            raise AdapterInputError(
                                f"{self.path} changed while s3lora was reading it; nothing was written, run again"
                            )
                        left -= len(block)
                        digest.update(block)
                        if name in self.drop:
                            continue
                        fh.write(bytes(len(block)) if name in self.zero else block)
                tail = src.read(1)
        except OSError as exc:
            raise AdapterInputError(f"{self.path}: cannot be read for pruning ({describe_os_error(exc)})") from None
        if (
            tail
            or len(head) != self.data_start
            or (expected_sha256 is not None and digest.hexdigest() != expected_sha256)
        ):
            raise AdapterInputError(f"{self.path} changed while s3lora was reading it; nothing was written, run again")

    def _write_from_pickle(self, fh: BinaryIO, metadata: Mapping[str, str], expected_sha256: str | None) -> None:
        """adapter_model.bin (plain tensors, ``weights_only=True``), memory-mapped where its format allows, written
        as safetensors one tensor at a time."""
        try:
            try:
                state = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError):  # the legacy (non-zip) format cannot be mapped
                state = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterInputError(f"{self.path}: cannot be read for pruning ({exc})") from None
        if not isinstance(state, dict):
            raise AdapterInputError(f"{self.path}: cannot be read for pruning (not a state dict)")
        names = sorted(str(k) for k in state if str(k) not in self.drop)
        for name in sorted(self.zero | self.drop):
            if name not in state:
                raise AdapterInputError(f"{self.path}: tensor {name!r} is not in the file")
        tensors = {str(k): v for k, v in state.items()}
        for name in names:
            if tensors[name].dtype not in _SAFETENSORS_NAMES:
                raise AdapterInputError(
                    f"{self.path}: tensor {name!r} has dtype {tensors[name].dtype}, which s3lora "
                    "cannot write to safetensors"
                )
        plan = [
            (
                n,
                _SAFETENSORS_NAMES[tensors[n].dtype],
                tuple(tensors[n].shape),
                tensors[n].numel() * tensors[n].element_size(),
            )
            for n in names
        ]
        _write_header(fh, plan, metadata)
        for name in names:
            tensor = tensors[name]
            if name in self.zero:
                fh.write(bytes(tensor.numel() * tensor.element_size()))
            else:
                fh.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if expected_sha256 is not None and file_sha256(self.path) != expected_sha256:
            raise AdapterInputError(f"{self.path} changed while s3lora was reading it; nothing was written, run again")


_SAFETENSORS_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_header(
    fh: BinaryIO, tensors: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]
) -> None:
    """The safetensors header of ``tensors`` (name, dtype, shape, bytes), laid out in that order, with
    ``metadata``: the 8-byte little-endian length, then the JSON padded with spaces to a multiple of 8."""
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, size in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)


def _pruned_config(config_path: Path, dropped: Sequence[str]) -> str:
    text = config_path.read_text(encoding="utf-8")
    if not dropped:
        return text
    raw = json.loads(text)
    raw["exclude_modules"] = merged_exclude_modules(raw.get("exclude_modules"), dropped)
    return json.dumps(raw, indent=2) + "\n"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
