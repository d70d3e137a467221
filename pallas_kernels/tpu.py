"""TPU (Mosaic) kernels of the MoE-LoRA op: grouped matmul, transposed grouped matmul, decode.

Dimensions: P_pad sorted pair rows (T tiles of tm rows), K contraction, N output columns,
Q packs of W = G*S lanes, D_pad in, O_pad out, V visits, rows_pad decode token rows.

The metadata of `pallas_kernels.metadata` rides as scalar prefetch (SMEM): the index maps read
it to pick which row tile and which pack each grid step DMAs, as in jax's megablox. The grid
is static (V = T + Q - 1 visits, the most any routing needs); visits past the live count
repeat the last live visit's block indices, so Mosaic's pipeline issues no DMA for them, and
their bodies do nothing. Accumulation is float32 in VMEM scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import cost, nbytes, precision_for
from pallas_kernels.metadata import DecodeGroups, PairGroups


def _gmm_kernel(
    tile_ref,
    group_ref,
    count_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    tm,
    transpose_rhs,
):
    """One (visit, K block) step: acc += lhs tile @ rhs[pack]; on the last K block, store the rows
    of the visit's pack. The first visit of a tile zeroes the rows no pack owns (padding), so the
    output is defined everywhere; later visits of the tile keep the rows earlier ones stored."""
    v, kk = pl.program_id(1), pl.program_id(2)
    live = v < count_ref[0]

    @pl.when(kk == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _accumulate():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(
            lhs_ref[...],
            rhs_ref[...],
            dims,
            precision=precision_for(lhs_ref.dtype),
            preferred_element_type=jnp.float32,
        )

    @pl.when(kk == pl.num_programs(2) - 1)
    def _store():
        # Scalars are folded into the integer bounds (a dead visit owns no rows): Mosaic handles
        # vector comparisons with scalar ints more readily than broadcasts of scalar booleans.
        g = group_ref[v]
        start = starts_ref[g]
        end = jnp.where(live, ends_ref[g], start)
        rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= start) & (rows < end)
        first_visit = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile_ref[v])

        @pl.when(first_visit)
        def _fresh_tile():
            out_ref[...] = jnp.where(mine, acc_ref[...], 0.0).astype(out_ref.dtype)

        @pl.when(jnp.logical_not(first_visit))
        def _revisited_tile():
            kept = out_ref[...].astype(jnp.float32)
            out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)


def gmm(lhs_pk, rhs_qkn, pg: PairGroups, *, tm, tk, tn, transpose_rhs=False, out_dtype, interpret):
    """out (P_pad, N): row p = lhs[p] @ rhs[pack of p] (rhs (Q, K, N), or (Q, N, K) transposed)."""
    p_pad, k = lhs_pk.shape
    n = rhs_qkn.shape[1] if transpose_rhs else rhs_qkn.shape[2]
    k_blocks, n_blocks = k // tk, n // tn
    g = pg.groups
    n_visits = g.visit_tile.shape[0]

    def kk_of(v, kk, count_ref):  # dead visits keep the last K block: no new DMA
        return jnp.where(v < count_ref[0], kk, k_blocks - 1)

    def lhs_map(nn, v, kk, tile, group, count, *_):
        return tile[v], kk_of(v, kk, count)

    def rhs_map(nn, v, kk, tile, group, count, *_):
        kk = kk_of(v, kk, count)
        return (group[v], nn, kk) if transpose_rhs else (group[v], kk, nn)

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    call = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((p_pad, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(n_blocks, n_visits, k_blocks),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), lambda nn, v, kk, tile, *_: (tile[v], nn)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost(
            2 * p_pad * k * n,
            nbytes(lhs_pk) * n_blocks
            + min(n_visits, rhs_qkn.shape[0]) * k * n * rhs_qkn.dtype.itemsize
            + p_pad * n * jnp.dtype(out_dtype).itemsize,
        ),
        name="moe_lora_gmm_tpu",
    )
    return call(
        g.visit_tile,
        g.visit_adapter,
        g.num_visits.reshape(1),
        g.group_starts,
        pg.group_ends,
        lhs_pk,
        rhs_qkn,
    )


def _tgmm_kernel(
    tile_ref, group_ref, count_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm
):
    """One visit: acc += lhs tile^T @ rhs tile over the pack's rows; the pack's last visit stores.

    Visits are sorted by pack, so each output block (one pack) is produced by a consecutive run
    of visits: zero on the run's first, store on its last (empty packs: one visit, zeros)."""
    v, n_visits = pl.program_id(2), pl.num_programs(2)
    g = group_ref[v]
    start, end = starts_ref[g], ends_ref[g]

    @pl.when((v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((v < count_ref[0]) & (end > start))
    def _accumulate():
        def masked(ref):
            rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, ref.shape, 0)
            return jnp.where((rows >= start) & (rows < end), ref[...].astype(jnp.float32), 0.0)

        # Contracting the row dim of both: Mosaic fuses the lhs transpose into the matmul.
        acc_ref[...] += lax.dot_general(
            masked(lhs_ref).astype(lhs_ref.dtype),
            masked(rhs_ref).astype(rhs_ref.dtype),
            (((0,), (0,)), ((), ())),
            precision=precision_for(lhs_ref.dtype),
            preferred_element_type=jnp.float32,
        )

    @pl.when((v == n_visits - 1) | (group_ref[jnp.minimum(v + 1, n_visits - 1)] != g))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_pk, rhs_pn, pg: PairGroups, *, tm, tk, tn, out_dtype, interpret):
    """out (Q, K, N): out[q] = lhs[rows of q]^T @ rhs[rows of q]; zeros for packs without rows."""
    p_pad, k = lhs_pk.shape
    n = rhs_pn.shape[1]
    q = pg.groups.group_sizes.shape[0]
    k_blocks, n_blocks = k // tk, n // tn
    n_visits = pg.tvisit_tile.shape[0]
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((q, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(k_blocks, n_blocks, n_visits),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda kk, nn, v, tile, *_: (tile[v], kk)),
                pl.BlockSpec((tm, tn), lambda kk, nn, v, tile, *_: (tile[v], nn)),
            ],
            out_specs=pl.BlockSpec((None, tk, tn), lambda kk, nn, v, tile, group, *_: (group[v], kk, nn)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost(
            2 * p_pad * k * n,
            nbytes(lhs_pk) * n_blocks + nbytes(rhs_pn) * k_blocks + q * k * n * jnp.dtype(out_dtype).itemsize,
        ),
        name="moe_lora_tgmm_tpu",
    )
    return call(
        pg.tvisit_tile,
        pg.tvisit_group,
        pg.tvisit_count.reshape(1),
        pg.groups.group_starts,
        pg.group_ends,
        lhs_pk,
        rhs_pn,
    )


def _decode_kernel(pack_ref, count_ref, x_ref, w_ref, a_ref, b_ref, out_ref, h_ref):
    """Visit v (one distinct pack), O block n: on n == 0, h = (x @ A[pack]) * lane weights of the
    tokens that chose the pack; then out[n] += h @ B[pack][:, n-th block]. The output is laid out
    (O blocks, rows, to) so the dynamic index is on the leading dim, never on the lanes."""
    v, nn = pl.program_id(0), pl.program_id(1)
    live = v < count_ref[0]

    @pl.when((v == 0) & (nn == 0))
    def _zero():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(live & (nn == 0))
    def _shrink():
        h = jnp.dot(
            x_ref[...], a_ref[...], precision=precision_for(x_ref.dtype), preferred_element_type=jnp.float32
        )
        h_ref[...] = h * w_ref[...]

    @pl.when(live)
    def _expand():
        out_ref[nn] += jnp.dot(
            h_ref[...].astype(b_ref.dtype),
            b_ref[...],
            precision=precision_for(b_ref.dtype),
            preferred_element_type=jnp.float32,
        )


def decode(x_rd, a_qdw, b_qwo, w_vrw, dg: DecodeGroups, *, td, to, interpret):
    """(rows_pad, O_pad) float32: sum over the distinct chosen packs of ((x @ A[q]) * w_q) @ B[q].

    Reads each chosen pack once however many tokens chose it; the (rows_pad, O_pad) output stays
    resident in VMEM for the whole grid. A pack's full (D_pad, W) slab is one block, hence the
    raised VMEM limit.
    """
    del td  # a pack's whole (D_pad, W) slab is one block: decode reads few packs, each once
    rows, d = x_rd.shape
    q, w, o = b_qwo.shape
    n_visits, n_blocks = w_vrw.shape[0], o // to

    def b_map(v, nn, pack, count):  # dead visits keep the last block: no new DMA
        return pack[v], 0, jnp.where(v < count[0], nn, n_blocks - 1)

    call = pl.pallas_call(
        _decode_kernel,
        out_shape=jax.ShapeDtypeStruct((n_blocks, rows, to), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(n_visits, n_blocks),
            in_specs=[
                pl.BlockSpec((rows, d), lambda v, nn, *_: (0, 0)),
                pl.BlockSpec(
                    (None, rows, w), lambda v, nn, pack, count: (jnp.minimum(v, count[0] - 1), 0, 0)
                ),
                pl.BlockSpec((None, d, w), lambda v, nn, pack, count: (pack[v], 0, 0)),
                pl.BlockSpec((None, w, to), b_map),
            ],
            out_specs=pl.BlockSpec((n_blocks, rows, to), lambda v, nn, *_: (0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((rows, w), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=48 * 1024 * 1024
        ),
        interpret=interpret,
        cost_estimate=cost(
            2 * n_visits * rows * w * (d + o),
            nbytes(x_rd, w_vrw) + n_visits * w * (d + o) * a_qdw.dtype.itemsize + rows * o * 4,
        ),
        name="moe_lora_decode_tpu",
    )
    y = call(dg.visit_pack, dg.num_live.reshape(1), x_rd, w_vrw, a_qdw, b_qwo)
    return y.transpose(1, 0, 2).reshape(rows, o)
