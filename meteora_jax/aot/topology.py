"""TPU slices to compile for from a CPU host: topology names and their devices (each chip's
peaks are in `meteora_jax.chips`).

`libtpu` (the `[tpu]` extra) describes a slice's devices without one (`get_topology_desc`), which
is enough for `jax.jit(...).lower(...).compile()` to run the real TPU compiler.
"""

from __future__ import annotations

import dataclasses
import re

from meteora_jax.chips import CHIPS, Chip
from meteora_jax.errors import ConfigError

INSTALL_HINT = "pip install -e '.[tpu]' (or `make tpu-compile`)"
# chips -> torus shape of the slices Cloud offers (2D: v5e / v6e, 3D: v4 / v5p)
SHAPES = {
    2: {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"},
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice (or `slices` slices joined over the data-centre network) by its torus shape."""

    generation: str
    shape: str  # "2x4", "4x4x4"
    slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def name(self) -> str:
        """The name libtpu takes, e.g. "v5e:2x4"."""
        return f"{self.generation}:{self.shape}"

    @property
    def chips(self) -> int:
        count = 1
        for n in self.shape.split("x"):
            count *= int(n)
        return count * self.slices

    def devices(self) -> list:
        """The devices of the slices (one per chip), from libtpu. Raises ConfigError without it."""
        try:
            from jax.experimental import topologies  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - part of jax
            raise ConfigError(f"jax.experimental.topologies is missing: {e}") from e
        try:
            desc = topologies.get_topology_desc(
                topology_name=self.name, platform="tpu", num_slices=self.slices
            )
        except Exception as e:  # noqa: BLE001  (libtpu missing or refusing the name: both are user-facing)
            raise ConfigError(
                f"--topology {self.name}: libtpu cannot describe it ({str(e).splitlines()[0][:200]}); "
                f"is libtpu installed? {INSTALL_HINT}"
            ) from e
        return list(desc.devices)


_CLOUD = re.compile(r"^(v\d+[a-z]?)-(\d+)$")
_TORUS = re.compile(r"^(v\d+[a-z]?):(\d+(?:x\d+){1,2})$")


def parse_topology(text: str, slices: int = Topology.slices) -> Topology:
    """`v5e-8` (a Cloud accelerator type) or `v5e:2x4` (a torus shape) -> Topology.

    Raises ConfigError naming the setting, with the generations and slice sizes known."""
    if not isinstance(slices, int) or isinstance(slices, bool) or slices < 1:
        raise ConfigError(f"--slices must be an integer >= 1, got {slices!r}")
    known = ", ".join(CHIPS)
    if (match := _TORUS.match(text)) is not None:
        generation, shape = match.groups()
        if generation not in CHIPS:
            raise ConfigError(f"--topology {text}: unknown TPU generation {generation!r} (known: {known})")
        if len(shape.split("x")) != CHIPS[generation].dims:
            raise ConfigError(f"--topology {text}: a {generation} slice is a {CHIPS[generation].dims}D torus")
        return Topology(generation, shape, slices)
    if (match := _CLOUD.match(text)) is not None:
        generation, count = match.group(1), int(match.group(2))
        if generation not in CHIPS:
            raise ConfigError(f"--topology {text}: unknown TPU generation {generation!r} (known: {known})")
        chip = CHIPS[generation]
        chips = count // 2 if chip.cores_in_name else count
        shapes = SHAPES[chip.dims]
        if chips not in shapes or (chip.cores_in_name and count % 2):
            sizes = ", ".join(f"{generation}-{n * 2 if chip.cores_in_name else n}" for n in shapes)
            raise ConfigError(f"--topology {text}: not a slice size this tool knows ({sizes})")
        return Topology(generation, shapes[chips], slices)
    raise ConfigError(f"--topology {text!r}: expected a name like v5e-8 or v5p:4x4x4 (generations: {known})")
