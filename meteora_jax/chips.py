"""TPU chips: published memory and peaks, a compiled program's roofline time on one, and a device
of each kind to compile for.

Shared by `meteora-jax compile` (a slice's report) and the MoE-LoRA op's `auto` choice on TPU,
which compares its candidates' compiled costs on the chip it compiles for.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's memory and peaks: `hbm_bytes`, dense bfloat16 `flops` per second and HBM
    `bandwidth` in bytes per second. `cores_in_name`: Cloud accelerator types count TensorCores
    (2 a chip) rather than chips for this generation (`v5p-8` is 4 chips)."""

    hbm_bytes: int
    flops: float
    bandwidth: float
    cores_in_name: bool
    dims: int  # 2: a 2D torus (v5e, v6e), 3: a 3D torus (v4, v5p)

    def roofline_seconds(self, flops: float, moved_bytes: float) -> float:
        """The time a program of `flops` and `moved_bytes` (XLA's counts) takes at this chip's
        peaks: the slower of computing and moving its bytes."""
        return max(flops / self.flops, moved_bytes / self.bandwidth)


def xla_counts(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a `jax.stages.Compiled` as XLA counts them (a loop's body once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


# Google Cloud's TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# HBM capacity, peak bf16 compute and HBM bandwidth per chip.
CHIPS = {
    "v4": Chip(hbm_bytes=32 * GIB, flops=275e12, bandwidth=1228e9, cores_in_name=True, dims=3),
    "v5e": Chip(hbm_bytes=16 * GIB, flops=197e12, bandwidth=819e9, cores_in_name=False, dims=2),
    "v5p": Chip(hbm_bytes=95 * GIB, flops=459e12, bandwidth=2765e9, cores_in_name=True, dims=3),
    "v6e": Chip(hbm_bytes=32 * GIB, flops=918e12, bandwidth=1640e9, cores_in_name=False, dims=2),
}
# `device.device_kind` as libtpu names each generation
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
NEWEST = "v6e"  # the peaks assumed for a chip this table does not know yet


def chip_of(device_kind: str) -> Chip:
    """The chip of a TPU device kind; one newer than the table gets `NEWEST`'s peaks."""
    return CHIPS[DEVICE_KINDS.get(device_kind, NEWEST)]


@functools.cache
def device_of(device_kind: str):
    """A TPU device of `device_kind` to compile for: one of this host's, else (compiling from a CPU
    host) the first chip of the smallest slice of its generation that libtpu describes. Raises
    ValueError for a kind neither knows."""
    for device in jax.devices():
        if device.device_kind == device_kind:
            return device
    if device_kind not in DEVICE_KINDS:
        known = ", ".join(DEVICE_KINDS)
        raise ValueError(f"no {device_kind!r} device here, and libtpu describes slices of {known} only")
    from jax.experimental import topologies  # noqa: PLC0415  (needs libtpu, only here)

    generation = DEVICE_KINDS[device_kind]
    shape = "2x2" if CHIPS[generation].dims == 2 else "2x2x1"
    return topologies.get_topology_desc(topology_name=f"{generation}:{shape}", platform="tpu").devices[0]
