"""Zero-copy reading of `.safetensors` files, and the project's one (atomic, streaming) writer.

safetensors' own numpy reader cannot return bfloat16 (the dtype of most LLaMA checkpoints)
and copies every tensor it returns. The format is one JSON header and raw little-endian
buffers, so we memory-map the file and hand out views: a tensor costs memory only when a
slice of it is materialised for a device.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from meteora_jax.errors import CheckpointError
from meteora_jax.io.files import atomic_file, raise_problems

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = frozenset(DTYPES[name] for name in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors crate's MAX_HEADER_SIZE


class SafetensorsFile:
    """A memory-mapped safetensors file: `names()`, `shape(name)`, `get(name)` -> read-only view.

    The header is validated as the format requires (the safetensors crate's rules): a sane
    length, a UTF-8 JSON object, a string-to-string `__metadata__`, known dtypes, shapes of
    non-negative integers, dtype x shape = byte length, and offsets that, sorted, tile the data
    exactly: from 0, contiguous, non-overlapping, ending at the end of the file. Any violation
    is a one-line CheckpointError naming the file and the tensor.
    """

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        header, header_len = _read_header(path, size)
        self.metadata = _check_metadata(header.pop("__metadata__", None), path)
        self._data_start = 8 + header_len
        self._entries = _parse_entries(header, size - self._data_start, path)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        start = self._data_start + begin
        return self._mmap[start : self._data_start + end].view(dtype).reshape(shape)


def _read_header(path: str, size: int) -> tuple[dict, int]:
    """The parsed JSON header and its length in bytes."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short: {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if not 2 <= header_len <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: not a safetensors file (bad header length {header_len} for a {size}-byte file; "
                f"at most {_MAX_HEADER})"
            )
        text = f.read(header_len)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, _DuplicateKeyError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict) or not text.startswith(b"{"):
        raise CheckpointError(
            f"{path}: not a safetensors file (header is not a JSON object starting with '{{')"
        )
    return header, header_len


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKeyError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _check_metadata(metadata: Any, path: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {_short(metadata)}")
    return metadata


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _entry(name: str, info: Any) -> tuple[tuple[np.dtype, tuple[int, ...], int, int] | None, str | None]:
    """(dtype, shape, begin, end) of one header entry, or the problem with it."""
    if not isinstance(info, dict):
        return None, f"tensor {name!r}: entry {_short(info)} is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return None, f"tensor {name!r}: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return None, f"tensor {name!r}: shape {_short(shape)} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return None, f"tensor {name!r}: data_offsets {_short(offsets)} are not two non-negative integers"
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        return None, (
            f"tensor {name!r}: dtype {dtype} x shape {shape} is {nbytes} bytes, but data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return (DTYPES[dtype], tuple(shape), begin, end), None


def _parse_entries(
    header: dict, data_len: int, path: str
) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """The tensor entries, checked one by one and then for tiling the `data_len` data bytes."""
    entries, problems = {}, []
    for name, info in header.items():
        entry, problem = _entry(name, info)
        if problem:
            problems.append(problem)
        else:
            entries[name] = entry
    raise_problems(CheckpointError, path, problems, max_shown=4)
    covered, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin < covered:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap (bytes {begin} to {covered})"
            )
        if begin > covered:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at byte {begin}, leaving bytes {covered} to {begin} {after} "
                "unused (tensors must be contiguous)"
            )
        covered, previous = end, name
    if covered > data_len:
        raise CheckpointError(
            f"{path}: tensor {previous!r} points outside the file (it ends at byte {covered} of the data, "
            f"but the file holds {data_len} data bytes: truncated?)"
        )
    if covered < data_len:
        raise CheckpointError(
            f"{path}: the tensors end at byte {covered} of the data, but the file holds {data_len} data "
            "bytes (bytes no tensor covers)"
        )
    return entries


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    progress: bool = False,
) -> None:
    """Writes a safetensors file atomically (`files.atomic_file`), one tensor at a time.

    tensors: arrays by name. Memory-mapped views (`SafetensorsFile.get`) are read only while
    they are written, and a non-contiguous array (a transpose) is copied one tensor at a time,
    so a 16 GB model never sits in memory twice. Tensors are laid out in name order after a
    header padded to 8 bytes. metadata: the header's string map (default `{"format": "pt"}`,
    which transformers expects). progress: show a byte progress bar (on a terminal).
    """
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"safetensors metadata must map strings to strings, got {metadata!r}")
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        value = tensors[name]
        dtype = np.dtype(value.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in a safetensors file")
        size = int(value.size) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with (
        atomic_file(path) as f,
        tqdm(
            total=offset,
            unit="B",
            unit_scale=True,
            desc=f"writing {os.path.basename(os.fspath(path))}",
            disable=None if progress else True,
        ) as bar,
    ):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            data = np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8)
            f.write(data.data)
            bar.update(data.size)
