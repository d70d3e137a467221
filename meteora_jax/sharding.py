"""Sharding, declared once: logical axis names -> mesh axes, through one rules table.

Every parameter carries `logical_axes` metadata (one name per dimension); activations are
constrained at block boundaries with the same names. The mesh has up to three axes:
`data` (pure data parallel), `fsdp` (data parallel with sharded parameters) and `tensor`
(model parallel). Axes absent from the mesh, or that do not divide a dimension, are dropped
for that dimension, so one table serves every mesh shape and every model size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from meteora_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}  # every device on fsdp: the training runs' default

# logical axis -> mesh axes it is split over (in order), or None for replicated.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "layers": None,
    "embed": ("fsdp",),
    "norm": None,
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "vocab": ("tensor",),
    "adapters": None,
    "lora_rank": None,
    "cache_length": None,
}
# Parameters only: fsdp, when the rules leave it unused, splits these dimensions. A LoRA B
# (adapters, rank, out=heads / mlp), an A or a gate on an o / down projection has no embed
# dimension, and would otherwise sit whole on every chip with its optimizer moments.
PARAMETER_FALLBACK: dict[str, tuple[str, ...]] = {"heads": ("fsdp",), "kv_heads": ("fsdp",), "mlp": ("fsdp",)}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data, fsdp, tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices do not split into data*fsdp*tensor={sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} need "
            f"{int(np.prod(sizes))} devices, found {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def active_mesh() -> Mesh | None:
    """The concrete mesh set by `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict = LOGICAL_RULES,
    fallback: dict | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry the logical `axes`.

    Mesh axes missing from `mesh`, of size 1, already used by an earlier dimension, or not
    dividing the dimension are dropped, so small models and odd sizes fall back to replication.
    `fallback` (logical axis -> mesh axes): a mesh axis the rules left unused goes to the first
    dimension whose logical axis lists it there (and which it divides).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    chosen: list[list[str]] = [[] for _ in axes]

    def take(dim: int, mesh_axis: str) -> bool:
        n = mesh.shape.get(mesh_axis, 1)
        split = int(np.prod([mesh.shape[a] for a in chosen[dim]])) * n
        if n > 1 and mesh_axis not in used and shape[dim] % split == 0:
            chosen[dim].append(mesh_axis)
            used.add(mesh_axis)
            return True
        return False

    for dim, name in enumerate(axes):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
        for mesh_axis in (rules.get(name) or ()) if name else ():
            take(dim, mesh_axis)
    for dim, name in enumerate(axes):  # a mesh axis already used is refused by `take`
        for mesh_axis in (fallback or {}).get(name, ()):
            take(dim, mesh_axis)
    return PartitionSpec(*(None if not c else c[0] if len(c) == 1 else tuple(c) for c in chosen))


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of one NNX variable from its `logical_axes` metadata."""
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, fallback=PARAMETER_FALLBACK))


def host_to_global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global `jax.Array` laid out by `sharding` from a host array every process holds whole
    (each device takes its slice; works across processes, unlike `jax.device_put`)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def partitioned_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh XLA partitions the current computation over, or None: no mesh, or one whose axes
    are already manual (inside someone's `shard_map`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.manual_axes else mesh


def per_device(fn, mesh: jax.sharding.AbstractMesh, in_specs, out_specs):
    """`fn` run on each device's blocks (`jax.shard_map`), for what XLA's partitioner cannot split
    (a Pallas call, a sort over all tokens) and would run on inputs gathered whole. Replicated
    inputs' gradients are summed over the mesh by the transpose; `fn` carries no varying-axes
    types (Pallas calls have none), so they are not checked."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axes; a no-op without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def parse_mesh(spec: str, setting: str = "--mesh") -> dict[str, int]:
    """`"data=2,fsdp=-1,tensor=2"` -> {"data": 2, "fsdp": -1, "tensor": 2}; absent axes are 1
    (fsdp -1 when no size is -1), so `"data=8"` is pure data parallelism."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in MESH_AXES or name in sizes:
            raise ConfigError(f"{setting} {spec!r}: expected NAME=SIZE items with names from {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(
                f"{setting} {spec!r}: size of {name} must be an integer, got {value!r}"
            ) from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ConfigError(f"{setting} {spec!r}: size of {name} must be >= 1 or -1, got {sizes[name]}")
    defaults = {"data": 1, "fsdp": 1 if -1 in sizes.values() or "fsdp" in sizes else -1, "tensor": 1}
    return {axis: sizes.get(axis, defaults[axis]) for axis in MESH_AXES}
