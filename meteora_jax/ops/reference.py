"""The MoE-LoRA layer stated as plainly as possible (SPEC section 1); the oracle for every path.

Dimensions: M tokens, D in, O out, L adapters, R rank, k chosen. It gathers the k chosen
adapters' weights per token (M x k x D x R): fine for tests, never used for real work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meteora_jax.ops.routing import Routing, RoutingSettings, route


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
    a_mkdr = a_ldr.astype(jnp.float32)[routing.ids]
    b_mkro = b_lro.astype(jnp.float32)[routing.ids]
    s_mk = scale_l.astype(jnp.float32)[routing.ids]
    h_mkr = jnp.einsum("md,mkdr->mkr", x, a_mkdr)
    delta_mo = jnp.einsum("mk,mkr,mkro->mo", routing.weights * s_mk, h_mkr, b_mkro)
    return x @ kernel_do.astype(jnp.float32) + delta_mo, routing
