"""The platform a program is traced for, which is not always the one running the trace."""

from __future__ import annotations

import jax


def target_platform() -> str:
    """The platform of the devices of the mesh set by `jax.set_mesh` ("tpu" when compiling for a
    TPU topology from a CPU host), else JAX's default backend. Works inside a trace too."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return jax.default_backend() if device is None else device.platform
