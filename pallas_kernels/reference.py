"""The MoE-LoRA delta stated plainly in jnp, float32: the one oracle of every test and device check,
and the one tolerance they compare with.

Dimensions: M tokens, k choices, D in, O out, L adapters, R rank.

`meteora_jax.ops.moe_lora_reference` (the whole layer: routing, base matmul, delta) builds on
`delta_reference`, so the delta math is written once, here, in the lowest layer.
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
    """`delta_reference` regrouped over all L adapters at once, float32: (M, L, R) intermediates
    instead of per-token (M, k, D, R) weight copies, so it fits in memory at real model sizes
    (the device check's large cases). Tests check it against `delta_reference`."""
    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    l = a_ldr.shape[0]
    coef_ml = jnp.einsum("mk,mkl->ml", coef_mk.astype(f32), jax.nn.one_hot(ids_mk, l, dtype=f32))
    h_mlr = jnp.einsum("md,ldr->mlr", x_md.astype(f32), a_ldr.astype(f32), precision=hp)
    return jnp.einsum("ml,mlr,lro->mo", coef_ml, h_mlr, b_lro.astype(f32), precision=hp)


_TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def tolerance(dtype) -> float:
    """The largest error allowed against the float32 oracle for a computation in `dtype`, as
    max |got - want| <= tolerance * (1 + max |want|) (the 1 + keeps near-zero outputs from
    making the bound unreachable). Used by every test that compares with the oracle and by
    `meteora_jax.bench.device_check`.

    float32: 2e-5. Unit roundoff is 2^-24 ~ 6e-8 and the sums here run over up to a few hundred
    terms (D, O, M*k), so summation order alone may move a result by ~1e-5 of its scale
    (measured: below 2e-6 for outputs and every gradient).

    bfloat16: 2e-2. bfloat16 keeps an 8-bit significand: one ulp is 2^-8 ~ 3.9e-3 of the value
    (round-to-nearest errs by half that). A MoE-LoRA output passes through about five bfloat16
    roundings (x @ A, times coef, @ B, x @ W, base + delta; each product a float32-accumulated
    K-long sum, rounded once), each of a value at most about the output's scale, so up to ~5 ulps:
    5 * 2^-8 ~ 2e-2. Measured worst cases: 8e-3 (the op, base matmul included) and 5.5e-3 (the
    kernels' outputs and gradients). A wrong adapter, a dropped choice or a wrong coefficient
    errs by order 1, far above it.

    Raises KeyError for other dtypes.
    """
    return _TOLERANCE[jnp.dtype(dtype)]
