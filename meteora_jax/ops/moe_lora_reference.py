"""The MoE-LoRA layer stated as plainly as possible (docs/method.md); the oracle for every path.

Dimensions: M tokens, D in, O out, L adapters, R rank, k chosen. The delta is
`pallas_kernels.reference.delta_reference` (the one statement of the delta math, shared with the
kernel tests); this adds the routing and the base matmul, all in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meteora_jax.ops.moe_lora import pair_coefficients
from meteora_jax.ops.routing import Routing, RoutingSettings, route
from pallas_kernels.reference import delta_reference


def moe_lora_reference(
    x_md: jax.Array,
    kernel_do: jax.Array,
    gate_dl: jax.Array,
    a_ldr: jax.Array,
    b_lro: jax.Array,
    scale_l: jax.Array,
    settings: RoutingSettings,
) -> tuple[jax.Array, Routing]:
    """y = x @ W + sum_j w_j * s_{id_j} * (x @ A_{id_j}) @ B_{id_j}, computed in float32."""
    x = x_md.astype(jnp.float32)
    routing = route(x, gate_dl, settings)
    base_mo = jnp.dot(x, kernel_do.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    delta_mo = delta_reference(x, a_ldr, b_lro, routing.ids, pair_coefficients(routing, scale_l))
    return base_mo + delta_mo, routing
