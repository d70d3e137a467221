"""Zero-copy reading of `.safetensors` files, and the project's one (atomic, streaming) writer.

safetensors' own numpy reader cannot return bfloat16 (the dtype of most LLaMA checkpoints)
and copies every tensor it returns. The format is one JSON header and raw little-endian
buffers, so we memory-map the file and hand out views: a tensor costs memory only when a
slice of it is materialised for a device.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from tqdm import tqdm

from meteora_jax.errors import CheckpointError
from meteora_jax.io.files import atomic_file

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
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped safetensors file: `names()`, `shape(name)`, `get(name)` -> read-only view."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has an unsupported or malformed entry"
                ) from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0 or self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: tensor {name!r} points outside the file or has the wrong size"
                )
            self._entries[name] = (dtype, shape, begin, end)
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
