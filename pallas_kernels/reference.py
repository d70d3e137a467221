"""The MoE-LoRA delta stated plainly in jnp, float32: the oracle of the kernel tests and device check.

Dimensions: M tokens, k choices, D in, O out, L adapters, R rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delta_reference(x_md, a_ldr, b_lro, ids_mk, coef_mk) -> jax.Array:
    """delta (M, O) float32 = sum_j coef[m, j] * (x[m] @ A[ids[m, j]]) @ B[ids[m, j]] (per-token gathers)."""
    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    h_mkr = jnp.einsum("md,mkdr->mkr", x_md.astype(f32), a_ldr.astype(f32)[ids_mk], precision=hp)
    return jnp.einsum("mk,mkr,mkro->mo", coef_mk.astype(f32), h_mkr, b_lro.astype(f32)[ids_mk], precision=hp)


def delta_reference_dense(x_md, a_ldr, b_lro, ids_mk, coef_mk) -> jax.Array:
    """The same delta through all L adapters at once, float32: (M, L, R) intermediates instead of
    per-token (M, k, D, R) weight copies, so it fits in memory at real model sizes."""
    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    l = a_ldr.shape[0]
    coef_ml = jnp.einsum("mk,mkl->ml", coef_mk.astype(f32), jax.nn.one_hot(ids_mk, l, dtype=f32))
    h_mlr = jnp.einsum("md,ldr->mlr", x_md.astype(f32), a_ldr.astype(f32), precision=hp)
    return jnp.einsum("ml,mlr,lro->mo", coef_ml, h_mlr, b_lro.astype(f32), precision=hp)
