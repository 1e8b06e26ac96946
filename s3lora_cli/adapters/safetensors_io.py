"""Tensor sources: a safetensors file, validated with bounded reads and then read lazily one tensor at a time,
and a PyTorch pickle checkpoint loaded only with ``torch.load(weights_only=True)``. Both expose ``keys``,
``shapes``, ``dtypes``, ``metadata``, ``path``, ``get(key)``, ``get_float(key, dtype)`` and ``close()``. A safetensors
file of floating-point factors is read without PyTorch (``get_float``); PyTorch is imported for ``get``, for
pickles and for the dtypes NumPy lacks."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from s3lora_cli.errors import AdapterInputError, one_line

# safetensors' own limit on the JSON header; a larger length field is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of each safetensors dtype that s3lora can read.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
"""PyTorch's name of each safetensors dtype (a PyTorch without one cannot read it)."""

_NUMPY_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
"""The stored floating-point dtypes that NumPy reads as they are (little-endian, as safetensors stores them); BF16
is read as the upper half of a float32, which it is."""

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it: dtype ("F32"), shape, and its byte range
    [begin, end) in the data section (the bytes after the header)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file: its tensors by name, and ``__metadata__`` ({} if none)."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` without trusting any size in it.

    Layout: an 8-byte little-endian header length N, N bytes of JSON (an object: tensor name ->
    {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" of strings), then
    the data section. Checked: N fits the file and MAX_HEADER_BYTES; the JSON is an object without duplicate
    keys; every dtype is known; every shape is a list of non-negative integers whose size times the dtype's
    width equals its byte range; the byte ranges neither overlap nor leave gaps and cover the data section
    exactly (a shorter file is truncated). Raises AdapterInputError with a one-line message.
    """
    try:
        with open_regular(path) as fh:
            info = os.fstat(fh.fileno())
            size = info.st_size
            if size < 8:
                raise AdapterInputError(f"{path}: not a safetensors file ({size} bytes; too short for a header)")
            length = int.from_bytes(fh.read(8), "little")
            if length > MAX_HEADER_BYTES:
                raise AdapterInputError(
                    f"{path}: not a safetensors file (header length {length} bytes is over "
                    f"the {MAX_HEADER_BYTES}-byte limit)"
                )
            if 8 + length > size:
                raise AdapterInputError(
                    f"{path}: not a safetensors file (header length {length} bytes, but the "
                    f"file has only {size - 8} bytes after the length field)"
                )
            text = fh.read(length)
    except OSError as exc:
        raise AdapterInputError(f"{path}: cannot be read ({one_line(exc)})") from None
    if len(text) != length:
        raise AdapterInputError(f"{path}: the file changed while it was read")
    raw = _decode_json(text, path)
    data_size = size - 8 - length
    metadata = raw.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterInputError(f"{path}: safetensors header: __metadata__ must map strings to strings")
    tensors = {name: _entry(name, value, path) for name, value in raw.items()}
    _check_layout(tensors, data_size, path)
    return SafetensorsHeader(tensors, dict(metadata), 8 + length)


def open_regular(path: Path):
    """``path`` opened read-only as a binary file object; a named pipe, device or directory is refused without
    blocking on it (O_NONBLOCK, then a check of what was opened)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterInputError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def unique_keys(where: str):
    """A ``json.loads`` object_pairs_hook that refuses a key appearing twice in one object (json keeps the
    last one silently; a reader of the first would be misled); ``where`` starts the message."""

    def pairs(items: list) -> dict:
        seen: dict = {}
        for key, value in items:
            if key in seen:
                raise AdapterInputError(f"{where}key {short_repr(key)} appears twice in one object")
            seen[key] = value
        return seen

    return pairs


def _decode_json(text: bytes, path: Path) -> dict:
    pairs = unique_keys(f"{path}: safetensors header: ")

    def constant(name: str):
        raise AdapterInputError(f"{path}: safetensors header: {name} is not valid JSON")

    try:
        raw = json.loads(text.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise AdapterInputError(f"{path}: not a safetensors file (the header is not UTF-8 text)") from None
    except RecursionError:
        raise AdapterInputError(f"{path}: safetensors header: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise AdapterInputError(f"{path}: not a safetensors file (the header is not JSON: {one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise AdapterInputError(f"{path}: safetensors header: expected a JSON object, got {type(raw).__name__}")
    return raw


def _entry(name: str, value, path: Path) -> TensorEntry:
    where = f"{path}: safetensors header: tensor {short_repr(name)}"
    if not isinstance(value, dict):
        raise AdapterInputError(f"{where} is described by {type(value).__name__}, not an object")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in value]
    if missing:
        raise AdapterInputError(f"{where} has no {', '.join(missing)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise AdapterInputError(f"{where} has unknown dtype {short_repr(dtype)} (known: {', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        raise AdapterInputError(f"{where}: shape must be a list of non-negative integers, got {short_repr(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterInputError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {short_repr(offsets)}"
        )
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise AdapterInputError(
            f"{where}: {dtype} {list(shape)} takes {nbytes} bytes but data_offsets "
            f"{list(offsets)} span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(tensors: dict[str, TensorEntry], data_size: int, path: Path) -> None:
    """The byte ranges, in order, must tile [0, data_size) exactly, as safetensors requires."""
    where = f"{path}: safetensors header"
    ordered = sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    end_max = max((entry.end for _, entry in ordered), default=0)
    if end_max > data_size:
        raise AdapterInputError(
            f"{path}: truncated: the tensors need {end_max} bytes of data but the file holds "
            f"{data_size} after the header"
        )
    position, previous = 0, None
    for name, entry in ordered:
        if entry.begin < position:
            raise AdapterInputError(
                f"{where}: tensor {short_repr(name)} overlaps tensor {short_repr(previous)} "
                f"(bytes {entry.begin}-{position})"
            )
        if entry.begin > position:
            raise AdapterInputError(
                f"{where}: bytes {position}-{entry.begin} of the data section belong to no "
                f"tensor (before {short_repr(name)}); the offsets do not cover the data"
            )
        position, previous = entry.end, name
    if position != data_size:
        raise AdapterInputError(
            f"{where}: {data_size - position} bytes after the last tensor belong to no tensor; "
            "the offsets do not cover the data section"
        )


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def short_repr(value, limit: int = 80) -> str:
    """repr of an untrusted value, cut to ``limit`` characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TensorSource(Protocol):
    """A weights file opened for reading, one tensor at a time: what every reader indexes and loads from."""

    path: Path
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a new tensor that owns its memory)."""
        ...

    def get_float(self, key: str, dtype: str) -> np.ndarray:
        """The tensor ``key``'s values in ``dtype`` ("float32" or "float64"), as a new NumPy array: each value
        converted as PyTorch's ``tensor.to(dtype)`` converts it."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


class SafetensorsSource:
    """A safetensors file opened for reading: the header is validated first (``read_safetensors_header``),
    then ``get`` reads one tensor's bytes at a time with a bounded read. The file is not memory-mapped, so a
    large file costs no address space, and a file cut short while it is read is an error, not a crash."""

    def __init__(self, path: Path) -> None:
        header = read_safetensors_header(path)
        self.path = path
        self._header: SafetensorsHeader | None = header
        self._size = header.data_start + max((e.end for e in header.tensors.values()), default=0)
        self.keys = sorted(header.tensors)
        self.shapes = {k: header.tensors[k].shape for k in self.keys}
        self.dtypes = {k: dtype_name(header.tensors[k].dtype) for k in self.keys}
        self.metadata = header.metadata

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read from the file now (a new tensor that owns its memory)."""
        import torch

        entry = self._entry(key)
        dtype = getattr(torch, _TORCH_DTYPES[entry.dtype], None)
        if dtype is None:
            raise AdapterInputError(
                f"{self.path}: tensor {short_repr(key)} has dtype {entry.dtype}, which this "
                f"version of PyTorch cannot read"
            )
        buffer = self._read(key, entry)
        if not buffer:
            return torch.empty(entry.shape, dtype=dtype)
        if dtype is torch.bool:  # any non-zero byte is true, as numpy reads it
            return torch.frombuffer(buffer, dtype=torch.uint8).ne(0).reshape(entry.shape)
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)
        return tensor if sys.byteorder == "little" else _from_little_endian(tensor)

    def get_float(self, key: str, dtype: str) -> np.ndarray:
        """The tensor ``key``'s values in ``dtype``, read from the file now: F64, F32, F16 and BF16 by NumPy alone
        (every one of them converts exactly, or to the nearest float32, as PyTorch converts it), any other dtype
        through ``get``."""
        entry = self._entry(key)
        if entry.dtype == "BF16":
            halves = np.frombuffer(self._read(key, entry), dtype="<u2")
            stored = (halves.astype(np.uint32) << 16).view(np.float32)
        elif entry.dtype in _NUMPY_FLOATS:
            stored = np.frombuffer(self._read(key, entry), dtype=_NUMPY_FLOATS[entry.dtype])
        else:
            return tensor_to_float(self.get(key), dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf; NaN stays NaN; as in PyTorch
            return stored.astype(dtype).reshape(entry.shape)

    def _entry(self, key: str) -> TensorEntry:
        header = self._header
        entry = header.tensors.get(key) if header is not None else None
        if entry is None:
            raise AdapterInputError(f"{self.path}: no tensor {short_repr(key)} open for reading")
        return entry

    def _read(self, key: str, entry: TensorEntry) -> bytearray:
        """The bytes of tensor ``key`` (described by ``entry``), read with a bounded read."""
        assert self._header is not None  # ``_entry`` found it open
        buffer = bytearray(entry.end - entry.begin)
        try:
            with open_regular(self.path) as fh:
                if os.fstat(fh.fileno()).st_size != self._size:
                    raise AdapterInputError(f"{self.path}: the file changed while it was read")
                fh.seek(self._header.data_start + entry.begin)
                got = fh.readinto(buffer)
        except OSError as exc:
            raise AdapterInputError(f"{self.path}: tensor {short_repr(key)} cannot be read ({one_line(exc)})") from None
        if got != len(buffer):
            raise AdapterInputError(f"{self.path}: the file changed while it was read")
        return buffer

    def close(self) -> None:
        self._header = None


def tensor_to_float(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor's values in ``dtype`` ("float32" or "float64") as a new NumPy array, converted by PyTorch."""
    import torch

    return tensor.to(dtype=getattr(torch, dtype)).contiguous().numpy().copy()


def _from_little_endian(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors stores little-endian; on a big-endian machine reverse each element's bytes."""
    import torch

    width = tensor.element_size()
    if width == 1:
        return tensor
    raw = tensor.reshape(-1).view(torch.uint8).reshape(-1, width).flip(1).contiguous()
    return raw.view(tensor.dtype).reshape(tensor.shape)


class PickleSource:
    """adapter_model.bin, loaded only with ``torch.load(weights_only=True)``: plain tensors, no code."""

    def __init__(self, path: Path) -> None:
        import torch

        try:
            open_regular(path).close()
        except OSError as exc:
            raise AdapterInputError(f"{path}: cannot be read ({one_line(exc)})") from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise AdapterInputError(
                    f"{path}: refused; it is not a plain tensor checkpoint that loads with weights_only=True "
                    f"({one_line(exc)}). Convert it to safetensors with a tool you trust."
                ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterInputError(f"{path}: expected a mapping of names to tensors")
        if not all(isinstance(k, str) for k in state):
            raise AdapterInputError(f"{path}: expected a mapping of names (strings) to tensors")
        for key, value in state.items():
            if value.layout is not torch.strided or value.is_meta or value.is_quantized or value.is_complex():
                raise AdapterInputError(
                    f"{path}: tensor {short_repr(key)} is not a plain dense real-valued tensor "
                    f"({value.layout}, {value.dtype})"
                )
        self._state = state
        self.path = path
        self.metadata: dict[str, str] = {}
        self.keys = list(state)
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._state:
            raise AdapterInputError(f"{self.path}: no tensor {short_repr(key)} open for reading")
        return self._state[key]

    def get_float(self, key: str, dtype: str) -> np.ndarray:
        return tensor_to_float(self.get(key), dtype)

    def close(self) -> None:
        self._state = {}


def dtype_name(safetensors_dtype: str) -> str:
    """torch's name of a safetensors dtype ("BF16" -> "bfloat16"), the spelling the .bin reader gives too."""
    return _SAFETENSORS_DTYPES.get(safetensors_dtype, safetensors_dtype.lower())
