"""GPU (Triton) kernels of the MoE-LoRA op: grouped matmul, transposed grouped matmul, decode.

Dimensions: P_pad sorted pair rows (T tiles of tm rows), K contraction, N output columns,
Q packs of W = G*S lanes, D_pad in, O_pad out, V decode visits, rows_pad decode token rows.

Triton has no scalar prefetch (index maps see only program ids) and no scratch memory, and its
programs run concurrently, so the TPU formulation (one grid step per visit, revisiting an output
tile) does not carry over. Instead every program owns one output block and loops, inside the
kernel, over what feeds it, reading the metadata as ordinary int32 inputs:
- gmm: one program per (row tile, N block); it loops over the packs its rows span
  (`tile_lo..tile_hi`, contiguous because rows are sorted) and over K, keeping the rows of each
  pack; each output block is written once, by one program: no races, no atomics.
- tgmm: one program per (pack, K block, N block); it loops over the row tiles of its pack.
- decode: one program per O block; it loops over the distinct chosen packs.
Accumulators live in registers; every loaded block has a power-of-two size and every dot dim is
>= 16 (`pallas_kernels.tiling` guarantees both).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import cost, nbytes, precision_for
from pallas_kernels.metadata import DecodeGroups, PairGroups

_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


def _whole(shape):
    """A block that is the whole array (Triton: a base pointer the kernel indexes itself)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gmm_kernel(
    lo_ref, hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, k_blocks, transpose_rhs
):
    """Program (row tile t, N block): for each pack among the tile's rows (contiguous, sorted),
    the tile @ rhs[pack] over all K blocks, kept for that pack's rows; one store at the end."""
    t, nn = pl.program_id(0), pl.program_id(1)
    tn = out_ref.shape[1]
    rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    cols = pl.ds(pl.multiple_of(nn * tn, tn), tn)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def pack_product(g):
        def k_step(kk, part):
            ks = pl.ds(pl.multiple_of(kk * tk, tk), tk)
            rhs = rhs_ref[g, cols, ks] if transpose_rhs else rhs_ref[g, ks, cols]
            return part + lax.dot_general(
                lhs_ref[:, ks],
                rhs,
                dims,
                precision=precision_for(lhs_ref.dtype),
                preferred_element_type=jnp.float32,
            )

        return lax.fori_loop(0, k_blocks, k_step, jnp.zeros((tm, tn), jnp.float32))

    def one_pack(g, acc):
        start, end = starts_ref[g], ends_ref[g]
        part = lax.cond(end > start, pack_product, lambda _: jnp.zeros((tm, tn), jnp.float32), g)
        return jnp.where((rows >= start) & (rows < end), part, acc)

    acc = lax.fori_loop(lo_ref[t], hi_ref[t] + 1, one_pack, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs_pk, rhs_qkn, pg: PairGroups, *, tm, tk, tn, transpose_rhs=False, out_dtype, interpret):
    """out (P_pad, N): row p = lhs[p] @ rhs[pack of p] (rhs (Q, K, N), or (Q, N, K) transposed)."""
    p_pad, k = lhs_pk.shape
    n = rhs_qkn.shape[1] if transpose_rhs else rhs_qkn.shape[2]
    n_tiles, n_blocks = p_pad // tm, n // tn
    meta = (pg.tile_lo, pg.tile_hi, pg.groups.group_starts, pg.group_ends)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, tk=tk, k_blocks=k // tk, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((p_pad, n), out_dtype),
        grid=(n_tiles, n_blocks),
        in_specs=[
            *(_whole(m.shape) for m in meta),
            pl.BlockSpec((tm, k), lambda t, nn: (t, 0)),
            _whole(rhs_qkn.shape),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda t, nn: (t, nn)),
        compiler_params=_PARAMS,
        interpret=interpret,
        cost_estimate=cost(
            2 * p_pad * k * n,
            nbytes(lhs_pk) * n_blocks
            + min(n_tiles, rhs_qkn.shape[0]) * k * n * rhs_qkn.dtype.itemsize
            + p_pad * n * jnp.dtype(out_dtype).itemsize,
        ),
        name="moe_lora_gmm_gpu",
    )(*meta, lhs_pk, rhs_qkn)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tm):
    """Program (pack g, K block, N block): sum over the pack's row tiles of lhs^T @ rhs, rows of
    other packs masked; a pack without rows loops zero times and stores zeros."""
    g = pl.program_id(0)
    tk, tn = out_ref.shape
    start, end = starts_ref[g], ends_ref[g]
    first = lax.div(start, tm)  # non-negative: truncation is floor, and cheaper in Triton
    stop = jnp.where(end > start, lax.div(end - 1, tm) + 1, first)

    def one_tile(t, acc):
        tile = pl.ds(pl.multiple_of(t * tm, tm), tm)
        rows_k = t * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
        rows_n = t * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        lhs = jnp.where((rows_k >= start) & (rows_k < end), lhs_ref[tile, :], jnp.zeros((), lhs_ref.dtype))
        rhs = jnp.where((rows_n >= start) & (rows_n < end), rhs_ref[tile, :], jnp.zeros((), rhs_ref.dtype))
        return acc + lax.dot_general(
            lhs,
            rhs,
            (((0,), (0,)), ((), ())),
            precision=precision_for(lhs_ref.dtype),
            preferred_element_type=jnp.float32,
        )

    acc = lax.fori_loop(first, stop, one_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs_pk, rhs_pn, pg: PairGroups, *, tm, tk, tn, out_dtype, interpret):
    """out (Q, K, N): out[q] = lhs[rows of q]^T @ rhs[rows of q]; zeros for packs without rows."""
    p_pad, k = lhs_pk.shape
    n = rhs_pn.shape[1]
    q = pg.groups.group_sizes.shape[0]
    meta = (pg.groups.group_starts, pg.group_ends)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((q, k, n), out_dtype),
        grid=(q, k // tk, n // tn),
        in_specs=[
            *(_whole(m.shape) for m in meta),
            pl.BlockSpec((p_pad, tk), lambda g, kk, nn: (0, kk)),
            pl.BlockSpec((p_pad, tn), lambda g, kk, nn: (0, nn)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, nn: (g, kk, nn)),
        compiler_params=_PARAMS,
        interpret=interpret,
        cost_estimate=cost(
            2 * p_pad * k * n,
            nbytes(lhs_pk) * (n // tn)
            + nbytes(rhs_pn) * (k // tk)
            + q * k * n * jnp.dtype(out_dtype).itemsize,
        ),
        name="moe_lora_tgmm_gpu",
    )(*meta, lhs_pk, rhs_pn)


def _decode_kernel(pack_ref, count_ref, x_ref, w_ref, a_ref, b_ref, out_ref, *, td, d_blocks):
    """Program (O block): for each distinct chosen pack, h = x @ A[pack] over the D blocks (all
    tokens at once), masked and scaled by the lane weights, then accumulate h @ B[pack][:, block]."""
    rows, to = out_ref.shape
    width = a_ref.shape[2]

    def one_visit(v, acc):
        q = pack_ref[v]

        def k_step(kk, h):
            ks = pl.ds(pl.multiple_of(kk * td, td), td)
            return h + jnp.dot(
                x_ref[:, ks],
                a_ref[q, ks, :],
                precision=precision_for(x_ref.dtype),
                preferred_element_type=jnp.float32,
            )

        h = lax.fori_loop(0, d_blocks, k_step, jnp.zeros((rows, width), jnp.float32))
        hw = (h * w_ref[v]).astype(b_ref.dtype)
        return acc + jnp.dot(
            hw, b_ref[q], precision=precision_for(b_ref.dtype), preferred_element_type=jnp.float32
        )

    out_ref[...] = lax.fori_loop(0, count_ref[0], one_visit, jnp.zeros((rows, to), jnp.float32))


def decode(x_rd, a_qdw, b_qwo, w_vrw, dg: DecodeGroups, *, td, to, interpret):
    """(rows_pad, O_pad) float32: sum over the distinct chosen packs of ((x @ A[q]) * w_q) @ B[q]."""
    rows, d = x_rd.shape
    q, w, o = b_qwo.shape
    n_visits = w_vrw.shape[0]
    count = dg.num_live.reshape(1)
    return pl.pallas_call(
        functools.partial(_decode_kernel, td=td, d_blocks=d // td),
        out_shape=jax.ShapeDtypeStruct((rows, o), jnp.float32),
        grid=(o // to,),
        in_specs=[
            _whole(dg.visit_pack.shape),
            _whole(count.shape),
            _whole(x_rd.shape),
            _whole(w_vrw.shape),
            _whole(a_qdw.shape),
            pl.BlockSpec((q, w, to), lambda nn: (0, 0, nn)),
        ],
        out_specs=pl.BlockSpec((rows, to), lambda nn: (0, nn)),
        compiler_params=_PARAMS,
        interpret=interpret,
        cost_estimate=cost(
            2 * n_visits * rows * w * (d + o),
            nbytes(x_rd, w_vrw) + n_visits * w * (d + o) * a_qdw.dtype.itemsize + rows * o * 4,
        ),
        name="moe_lora_decode_gpu",
    )(dg.visit_pack, count, x_rd, w_vrw, a_qdw, b_qwo)
