"""The differentiable MoE-LoRA delta on the Pallas kernels: forward, custom VJP, dispatch.

Dimensions: M tokens, k choices, P = M*k pairs (P_pad padded), D in, O out, L adapters, R rank,
W pack width, Q packs.

    delta (M, O) = sum_j coef[m, j] * (x[m] @ A[ids[m, j]]) @ B[ids[m, j]]

Forward, prefill / training (M > decode_tokens): sort pairs by pack, h = gmm(x_sorted, A_packed)
(the shrink, float32), hw = h * lane weights (coef on the row's own lanes), y = gmm(hw, B_packed)
(the expand), then each token sums its k rows. Forward, decode: one kernel over the distinct
chosen packs. Backward (either forward), with dy (M, O) sorted like the pairs:
    dhw = gmm(dy_sorted, B_packed^T)                 (P_pad, W)
    dcoef[p] = sum over the row's lanes of h * dhw    (the gradient reaching the gates)
    dh = dhw * lane weights
    dx = per-token sum of gmm(dh, A_packed^T)         the shrink's transpose
    dA = tgmm(x_sorted, dh), dB = tgmm(hw, dy_sorted)  one block per pack, accumulated over its rows
dA / dB are computed only for adapters being differentiated: the VJP uses symbolic zeros
(`jax.custom_vjp(..., symbolic_zeros=True)`), so when the caller differentiates with respect to
the gates only (A and B closed over, `stop_gradient`-ed, or not in `jax.grad`'s argnums, as with
an optimizer over `GateParam`), no tgmm runs. `train_adapters=False` forces this even when A and
B are differentiated (their gradients are then zero); likewise dx and dcoef are skipped when x or
coef are not differentiated.

Residuals are the inputs (alive anyway) and h (P_pad, W) float32; the metadata, the sorted rows
and the packed adapters are recomputed in the backward rather than stored per layer. Packing A
is a transpose, i.e. one copy of the adapter stack per call (B packs by reshape); a caller that
keeps its adapters pre-packed could skip it, which is the one layout change worth making upstream.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels import gpu, tpu
from pallas_kernels.metadata import (
    decode_groups,
    decode_weights,
    lane_mask,
    lane_weights,
    pack_a,
    pack_b,
    pair_groups,
    sort_pairs,
    sorted_rows,
    unpack_a,
    unpack_b,
    unsort_pairs,
    unsort_sum,
)
from pallas_kernels.platform import target_platform
from pallas_kernels.tiling import Plan, Tiling, default_tiling, make_plan

_KERNELS: dict[str, ModuleType] = {"tpu": tpu, "gpu": gpu}


def moe_lora_delta(
    x_md: jax.Array,
    a_ldr: jax.Array,
    b_lro: jax.Array,
    ids_mk: jax.Array,
    coef_mk: jax.Array,
    *,
    interpret: bool | None = None,
    tiling: Tiling | None = None,
    train_adapters: bool | None = None,
) -> jax.Array:
    """delta (M, O) = sum_j coef[m, j] * (x[m] @ A[ids[m, j]]) @ B[ids[m, j]], differentiable.

    x (M, D) in the compute dtype (A and B are cast to it; accumulation is float32); A (L, D, R),
    B (L, R, O) with mixed ranks zero-padded to R; ids (M, k) int adapter ids in [0, L); coef
    (M, k) routing weight * adapter scale. Returns (M, O) in x's dtype.
    interpret: None = interpret mode exactly when the target platform (`target_platform`) is the CPU.
    tiling: None = `default_tiling(target_platform())` (its flavour picks TPU or GPU kernels).
    train_adapters: None (or True) = dA / dB exactly when A / B are differentiated; False = never
    (frozen adapters: their gradients are zeros and no dA / dB kernel runs).
    Raises ValueError on inconsistent shapes.
    """
    m, d = x_md.shape
    l, d_a, r = a_ldr.shape
    o = b_lro.shape[-1]
    if d_a != d or b_lro.shape[:2] != (l, r):
        raise ValueError(f"moe_lora_delta: x {x_md.shape}, A {a_ldr.shape}, B {b_lro.shape} do not chain")
    if ids_mk.shape != coef_mk.shape or ids_mk.shape[:1] != (m,):
        raise ValueError(f"moe_lora_delta: ids {ids_mk.shape} and coef {coef_mk.shape} must both be ({m}, k)")
    if m == 0 or ids_mk.shape[1] == 0:
        return jnp.zeros((m, o), x_md.dtype)
    backend = target_platform()
    plan = make_plan(
        tiling or default_tiling(backend),
        tokens=m,
        choices=ids_mk.shape[1],
        d=d,
        o=o,
        adapters=l,
        rank=r,
        itemsize=jnp.dtype(x_md.dtype).itemsize,
        interpret=backend == "cpu" if interpret is None else bool(interpret),
        train_adapters=train_adapters,
    )
    return _delta(x_md, a_ldr, b_lro, ids_mk.astype(jnp.int32), coef_mk, plan)


def _shrink(x_p, a_q, pg, plan: Plan, kern):
    """h (P_pad, W) float32 = x_sorted @ A_packed[pack of each row]."""
    return kern.gmm(
        x_p, a_q, pg, tm=plan.tm, tk=plan.td, tn=plan.width, out_dtype=jnp.float32, interpret=plan.interpret
    )


def _forward(x, a, b, ids, coef, plan: Plan):
    """(delta, h): h is the shrink output the backward reuses (None on the decode path)."""
    kern, dt = _KERNELS[plan.flavor], x.dtype
    a_q, b_q = pack_a(a.astype(dt), plan), pack_b(b.astype(dt), plan)
    if plan.decode:
        dg = decode_groups(ids, plan)
        x_rd = jnp.pad(x, ((0, plan.rows_pad - plan.tokens), (0, plan.d_pad - plan.d)))
        y = kern.decode(
            x_rd,
            a_q,
            b_q,
            decode_weights(coef, ids, dg, plan),
            dg,
            td=plan.td,
            to=plan.to,
            interpret=plan.interpret,
        )
        return y[: plan.tokens, : plan.o].astype(dt), None
    pg = pair_groups(ids, plan)
    h = _shrink(sorted_rows(x, pg, plan, plan.d_pad), a_q, pg, plan, kern)
    hw = (h * lane_weights(sort_pairs(coef, pg, plan), pg.slot_p, plan)).astype(dt)
    y_p = kern.gmm(hw, b_q, pg, tm=plan.tm, tk=plan.width, tn=plan.to, out_dtype=dt, interpret=plan.interpret)
    return unsort_sum(y_p, pg, plan, plan.o).astype(dt), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _delta(x, a, b, ids, coef, plan: Plan):
    return _forward(x, a, b, ids, coef, plan)[0]


def _delta_fwd(x, a, b, ids, coef, plan: Plan):
    """Residuals: the inputs (alive anyway) and h; everything else is recomputed in the backward."""
    delta, h = _forward(x.value, a.value, b.value, ids.value, coef.value, plan)
    frozen = plan.train_adapters is False
    needs = (x.perturbed, a.perturbed and not frozen, b.perturbed and not frozen, coef.perturbed)
    return delta, (x.value, a.value, b.value, ids.value, coef.value, h, needs)


def _delta_bwd(plan: Plan, res, dy):
    x, a, b, ids, coef, h, (need_x, need_a, need_b, need_coef) = res
    if isinstance(dy, SymbolicZero) or not any((need_x, need_a, need_b, need_coef)):
        return None, None, None, None, None
    kern, dt = _KERNELS[plan.flavor], x.dtype
    gmm = functools.partial(kern.gmm, tm=plan.tm, interpret=plan.interpret)
    tgmm = functools.partial(kern.tgmm, tm=plan.tm, interpret=plan.interpret)
    pg = pair_groups(ids, plan)
    a_q, b_q = pack_a(a.astype(dt), plan), pack_b(b.astype(dt), plan)
    x_p = sorted_rows(x, pg, plan, plan.d_pad) if (h is None or need_a) else None
    if h is None:  # decode forward: the shrink was fused away, redo it here
        h = _shrink(x_p, a_q, pg, plan, kern)
    mask = lane_mask(pg.slot_p, plan)
    w = jnp.where(mask, sort_pairs(coef, pg, plan).astype(jnp.float32)[:, None], 0.0)
    dy_p = sorted_rows(dy.astype(dt), pg, plan, plan.o_pad)

    dx = da = db = dcoef = None
    if need_x or need_a or need_coef:
        dhw = gmm(dy_p, b_q, pg, tk=plan.to, tn=plan.width, transpose_rhs=True, out_dtype=jnp.float32)
        if need_coef:
            dcoef_p = jnp.sum(jnp.where(mask, h * dhw, 0.0), axis=-1)
            dcoef = unsort_pairs(dcoef_p, pg, plan).astype(coef.dtype)
        dh = (dhw * w).astype(dt)
        if need_x:
            dx_p = gmm(dh, a_q, pg, tk=plan.width, tn=plan.td, transpose_rhs=True, out_dtype=dt)
            dx = unsort_sum(dx_p, pg, plan, plan.d).astype(x.dtype)
        if need_a:
            da = unpack_a(tgmm(x_p, dh, pg, tk=plan.td, tn=plan.width, out_dtype=jnp.float32), plan)
            da = da.astype(a.dtype)
    if need_b:
        hw = (h * w).astype(dt)
        db = unpack_b(tgmm(hw, dy_p, pg, tk=plan.width, tn=plan.to, out_dtype=jnp.float32), plan)
        db = db.astype(b.dtype)
    return dx, da, db, None, dcoef


_delta.defvjp(_delta_fwd, _delta_bwd, symbolic_zeros=True)
