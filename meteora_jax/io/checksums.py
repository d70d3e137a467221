"""Checksums of saved arrays, so a checkpoint that changed on disk is refused rather than loaded.

Orbax stores arrays zstd-compressed without a content checksum: flipping bytes inside a
compressed block often decompresses into other values, silently. So at save every leaf of
every item gets a record `{"dtype", "shape", "sha256"}` in the step's metadata, keyed
`item/path/to/leaf`, and at restore each restored leaf is hashed again and compared.

The hash is sha256 over the dtype name, the shape and the C-order bytes of the array on the
host (a sharded `jax.Array` that is not fully addressable is gathered first). Leaf paths
use plain key names (`opt/0/mu/w`), so a NamedTuple saved and restored as a dict (Orbax does
that without a target) keeps its names. Cost: one pass over the bytes, ~1 GB/s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils


def host_array(x: Any) -> np.ndarray:
    """`x` as a numpy array on this host, gathering a multi-host `jax.Array` first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def array_record(x: Any) -> dict:
    """{"dtype", "shape", "sha256"} of one array (see the module docstring)."""
    value = np.ascontiguousarray(host_array(x))
    digest = hashlib.sha256(f"{value.dtype.name}{list(value.shape)}".encode())
    digest.update(value.reshape(-1).view(np.uint8).data)
    return {"dtype": value.dtype.name, "shape": list(value.shape), "sha256": digest.hexdigest()}


_LOW_FLOATS = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaves(item: str, tree: Any) -> dict[str, Any]:
    """{"item/path/to/leaf": leaf} for every leaf of a pytree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join([item, *(_key_name(k) for k in path)]): leaf for path, leaf in flat}


def tree_records(item: str, tree: Any) -> dict[str, dict]:
    """The checksum record of every leaf of one saved item, by leaf name."""
    return {name: array_record(leaf) for name, leaf in leaves(item, tree).items()}


def mismatches(item: str, tree: Any, records: Mapping[str, Any]) -> list[str]:
    """Problems of one restored item against the saved records (empty when every leaf matches).

    A leaf restored at another dtype than saved (a target asking for a cast) is cast back first,
    which is exact for widening casts.
    """
    restored = leaves(item, tree)
    expected = {n: r for n, r in records.items() if n.split("/", 1)[0] == item}
    problems = [
        f"array {name} is in the checkpoint's checksums but was not restored"
        for name in sorted(expected.keys() - restored.keys())
    ]
    for name, leaf in restored.items():
        record = expected.get(name)
        if not isinstance(record, Mapping):
            problems.append(f"array {name} has no checksum in the metadata")
            continue
        value = _as_saved_dtype(host_array(leaf), record.get("dtype"))
        got = array_record(value)
        if got["shape"] != record.get("shape"):
            problems.append(
                f"array {name} has shape {tuple(got['shape'])}, its checksum record {record.get('shape')!r}"
            )
        elif got != dict(record):
            problems.append(f"array {name} does not match its checksum (its file changed after saving)")
    return problems


def _as_saved_dtype(value: np.ndarray, saved: Any) -> np.ndarray:
    """`value` cast to the dtype named in its record, when that is another valid dtype."""
    if not isinstance(saved, str) or saved == value.dtype.name:
        return value
    try:
        dtype = np.dtype(saved)
        return value.astype(dtype) if dtype.kind in "biuf" or dtype in _LOW_FLOATS else value
    except (TypeError, ValueError):
        return value  # not a dtype we cast to: the record comparison reports the mismatch
