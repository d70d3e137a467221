"""The MoE-LoRA op used by `MoELoRALinear`.

Dimensions: M tokens, D in, O out, L adapters, R rank (padded to the largest), k chosen.

Backends:
- "xla" (dense): all adapters as one D x (L*R) matmul, each adapter's R columns scaled by its
  routing weight (zero for adapters not chosen), then one (L*R) x O matmul. Work is
  M*(D + O)*L*R: close to free while L*R is small next to D and O (the MeteoRA case of 28
  adapters of rank 8 on a 4096-wide model), no per-token copy of adapter weights.
- "auto": the best available backend for the platform and shape; today that is "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meteora_jax.ops.routing import Routing, RoutingSettings, route

BACKENDS = ("auto", "xla")


def combine_weights(routing: Routing, scale_l: jax.Array, num_adapters: int) -> jax.Array:
    """(M, L) per-adapter multipliers: routing weight * LoRA scale, zero for unchosen adapters."""
    one_hot_mkl = jax.nn.one_hot(routing.ids, num_adapters, dtype=routing.weights.dtype)
    return jnp.einsum("mk,mkl->ml", routing.weights, one_hot_mkl) * scale_l.astype(routing.weights.dtype)


def _dense_delta(x_md, a_ldr, b_lro, coef_ml):
    h_mlr = jnp.einsum("md,ldr->mlr", x_md, a_ldr.astype(x_md.dtype))
    h_mlr = h_mlr * coef_ml.astype(x_md.dtype)[:, :, None]
    return jnp.einsum("mlr,lro->mo", h_mlr, b_lro.astype(x_md.dtype))


def moe_lora(
    x_md: jax.Array,
    kernel_do: jax.Array,
    gate_dl: jax.Array,
    a_ldr: jax.Array,
    b_lro: jax.Array,
    scale_l: jax.Array,
    settings: RoutingSettings,
    *,
    backend: str = "auto",
    lora_x_md: jax.Array | None = None,
    forced_m: jax.Array | None = None,
) -> tuple[jax.Array, Routing]:
    """The MeteoRA linear: base projection plus the gate-weighted top-k LoRA experts.

    x_md: (M, D) in the compute dtype; kernel (D, O); gate (D, L); A (L, D, R); B (L, R, O);
    scale (L,). lora_x_md: the LoRA input if it differs from x (dropout in training).
    forced_m: (M,) adapter per token bypassing the gate (-1: base only).
    Returns y (M, O) in x's dtype and the Routing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    routing = route(x_md, gate_dl, settings, forced_m)
    coef_ml = combine_weights(routing, scale_l, a_ldr.shape[0])
    lora_x = x_md if lora_x_md is None else lora_x_md
    y_mo = jnp.dot(x_md, kernel_do.astype(x_md.dtype)) + _dense_delta(lora_x, a_ldr, b_lro, coef_ml)
    return y_mo.astype(x_md.dtype), routing
