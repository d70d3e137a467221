"""Pure-jnp metadata of the MoE-LoRA kernels: the packed adapter layout and the sorted-pair groups.

Dimensions: M tokens, k choices, P = M*k pairs (P_pad: padded to whole row tiles), D in, O out,
L adapters, R rank, S rank slot, G adapters per pack, W = G*S pack width, Q packs, T row tiles
of tm rows, V visits. Everything here has static shapes and runs anywhere (CPU tests, the XLA
glue around the kernels, the scalar-prefetch operands of the TPU kernels).

Pairs are grouped by *pack* (adapter // G), not by adapter: `pallas_kernels.grouping`
sorts them and lists the (tile, pack) visits of the forward kernels; this module adds the
per-row adapter slot (which S lanes of the pack a row owns), the visits of the transposed
kernel (every pack visited at least once, so packs without rows get zero gradients), the pack
range of each row tile (the GPU kernels loop over it), and the distinct packs of a decode call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.grouping import GroupMetadata, group_metadata
from pallas_kernels.tiling import Plan

# ---------------------------------------------------------------------------------------------
# Packed adapter layout: A (L, D, R) -> (Q, D_pad, W), B (L, R, O) -> (Q, W, O_pad).


def pack_a(a_ldr: jax.Array, plan: Plan) -> jax.Array:
    """A (L, D, R) -> (Q, D_pad, W): adapter q*G + g owns lanes [g*S, (g+1)*S) of pack q."""
    l, d, r = a_ldr.shape
    a = jnp.pad(a_ldr, ((0, plan.num_packs * plan.per_pack - l), (0, plan.d_pad - d), (0, plan.slot - r)))
    a = a.reshape(plan.num_packs, plan.per_pack, plan.d_pad, plan.slot)
    return a.transpose(0, 2, 1, 3).reshape(plan.num_packs, plan.d_pad, plan.width)


def pack_b(b_lro: jax.Array, plan: Plan) -> jax.Array:
    """B (L, R, O) -> (Q, W, O_pad): the same lanes as rows; a pure reshape once padded."""
    l, r, o = b_lro.shape
    b = jnp.pad(b_lro, ((0, plan.num_packs * plan.per_pack - l), (0, plan.slot - r), (0, plan.o_pad - o)))
    return b.reshape(plan.num_packs, plan.width, plan.o_pad)


def unpack_a(a_qdw: jax.Array, plan: Plan) -> jax.Array:
    """The inverse of `pack_a` (used on the gradient)."""
    a = a_qdw.reshape(plan.num_packs, plan.d_pad, plan.per_pack, plan.slot).transpose(0, 2, 1, 3)
    a = a.reshape(plan.num_packs * plan.per_pack, plan.d_pad, plan.slot)
    return a[: plan.adapters, : plan.d, : plan.rank]


def unpack_b(b_qwo: jax.Array, plan: Plan) -> jax.Array:
    """The inverse of `pack_b` (used on the gradient)."""
    b = b_qwo.reshape(plan.num_packs * plan.per_pack, plan.slot, plan.o_pad)
    return b[: plan.adapters, : plan.rank, : plan.o]


def lane_mask(slot_p: jax.Array, plan: Plan) -> jax.Array:
    """(rows, W) bool: the S lanes of each row's adapter inside its pack."""
    lanes = jnp.arange(plan.width, dtype=jnp.int32) // plan.slot
    return lanes[None, :] == slot_p[:, None]


# ---------------------------------------------------------------------------------------------
# Sorted pairs (prefill / training kernels).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairGroups:
    """Pairs sorted by pack, and the visits the kernels walk.

    groups: the GroupMetadata over packs (order, sorted_token, sorted_adapter = pack,
    group_sizes / group_starts (Q,), visit_tile / visit_adapter (V,), num_visits).
    inverse: (P,) sorted row of each pair (m*k + j). token_p / slot_p: (P_pad,) token and slot of
    each sorted row (0 on padding rows). valid_p: (P_pad,) row < P. group_ends: (Q,).
    tvisit_tile / tvisit_group: (V,) visits of the transposed kernel, every pack at least once;
    tvisit_count: () live ones. tile_lo / tile_hi: (T,) first and last pack of each row tile.
    """

    groups: GroupMetadata
    inverse: jax.Array
    token_p: jax.Array
    slot_p: jax.Array
    valid_p: jax.Array
    group_ends: jax.Array
    tvisit_tile: jax.Array
    tvisit_group: jax.Array
    tvisit_count: jax.Array
    tile_lo: jax.Array
    tile_hi: jax.Array


def _transposed_visits(group_sizes, group_starts, tm: int, num_tiles: int):
    """Visits (tile, pack) for the transposed kernel: like the forward visits but an empty pack
    gets one visit too (with an empty row mask), so its gradient block is written (zeros).

    Bound: non-empty packs touch at most T + (#non-empty - 1) tiles, empty ones one visit each,
    so V = T + Q - 1 always suffices; visits past the live count repeat the last live one.
    """
    q = group_sizes.shape[0]
    first = jnp.minimum(group_starts // tm, num_tiles - 1)
    last = jnp.where(group_sizes > 0, (group_starts + group_sizes - 1) // tm, first)
    per_group = last - first + 1
    offsets = jnp.cumsum(per_group) - per_group
    count = jnp.sum(per_group).astype(jnp.int32)
    live_v = jnp.minimum(jnp.arange(num_tiles + q - 1, dtype=jnp.int32), count - 1)
    group = jnp.searchsorted(offsets + per_group, live_v, side="right").astype(jnp.int32)
    group = jnp.minimum(group, q - 1)
    tile = (first[group] + live_v - offsets[group]).astype(jnp.int32)
    return tile, group, count


def pair_groups(ids_mk: jax.Array, plan: Plan) -> PairGroups:
    """Sorts the (token, choice) pairs of ids (M, k) by pack and lists every kernel's visits."""
    p, pad = plan.pairs, plan.pairs_pad - plan.pairs
    ids_p = ids_mk.reshape(p).astype(jnp.int32)
    groups = group_metadata((ids_p // plan.per_pack).reshape(ids_mk.shape), plan.num_packs, plan.tm)
    inverse = jnp.zeros((p,), jnp.int32).at[groups.order].set(jnp.arange(p, dtype=jnp.int32))
    group_ends = groups.group_starts + groups.group_sizes
    tvisit_tile, tvisit_group, tvisit_count = _transposed_visits(
        groups.group_sizes, groups.group_starts, plan.tm, plan.num_tiles
    )
    tile_first_row = jnp.arange(plan.num_tiles, dtype=jnp.int32) * plan.tm
    return PairGroups(
        groups=groups,
        inverse=inverse,
        token_p=jnp.pad(groups.sorted_token, (0, pad)),
        slot_p=jnp.pad(ids_p[groups.order] % plan.per_pack, (0, pad)),
        valid_p=jnp.arange(plan.pairs_pad) < p,
        group_ends=group_ends.astype(jnp.int32),
        tvisit_tile=tvisit_tile,
        tvisit_group=tvisit_group,
        tvisit_count=tvisit_count,
        tile_lo=groups.sorted_adapter[tile_first_row],
        tile_hi=groups.sorted_adapter[jnp.minimum(tile_first_row + plan.tm - 1, p - 1)],
    )


def sort_pairs(values_mk: jax.Array, pg: PairGroups, plan: Plan) -> jax.Array:
    """(M, k) per-pair values -> (P_pad,) in sorted order, zero on padding rows."""
    sorted_p = values_mk.reshape(plan.pairs)[pg.groups.order]
    return jnp.pad(sorted_p, (0, plan.pairs_pad - plan.pairs))


def unsort_pairs(values_p: jax.Array, pg: PairGroups, plan: Plan) -> jax.Array:
    """(P_pad,) sorted per-pair values -> (M, k)."""
    return values_p[pg.inverse].reshape(plan.tokens, plan.choices)


def sorted_rows(x_mc: jax.Array, pg: PairGroups, plan: Plan, cols_pad: int) -> jax.Array:
    """(M, C) token rows -> (P_pad, cols_pad): each pair's token row in sorted order, zeros elsewhere."""
    rows = jnp.pad(x_mc, ((0, 0), (0, cols_pad - x_mc.shape[1])))[pg.token_p]
    return jnp.where(pg.valid_p[:, None], rows, jnp.zeros((), x_mc.dtype))


def unsort_sum(y_pc: jax.Array, pg: PairGroups, plan: Plan, cols: int) -> jax.Array:
    """(P_pad, C_pad) sorted pair rows -> (M, cols): the k rows of each token summed in float32.

    A gather by the inverse permutation, not a scatter-add: deterministic and cheap on every
    backend; XLA fuses the sum and the column slice into it.
    """
    y = y_pc[pg.inverse].reshape(plan.tokens, plan.choices, -1)[:, :, :cols]
    return jnp.sum(y.astype(jnp.float32), axis=1)


def lane_weights(coef_p: jax.Array, slot_p: jax.Array, plan: Plan) -> jax.Array:
    """(rows, W) float32: coef on the row's S lanes, zero on the other adapters' lanes of the pack.

    Multiplying the shrink output by this both scales the row and masks the G-1 foreign
    adapters the packed matmul computed for free, so the expand's (W x O) matmul adds exactly
    coef * h @ B[adapter].
    """
    return jnp.where(lane_mask(slot_p, plan), coef_p.astype(jnp.float32)[:, None], 0.0)


# ---------------------------------------------------------------------------------------------
# Decode: the distinct packs of a few tokens.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeGroups:
    """The distinct packs among a decode call's pairs, V = min(P, Q) visit slots.

    visit_pack: (V,) pack of each visit (visits past `num_live` repeat the last live pack, so the
    kernel re-reads nothing). visit_of_pair: (P,) the visit of each pair.
    """

    visit_pack: jax.Array
    visit_of_pair: jax.Array
    num_live: jax.Array


def decode_groups(ids_mk: jax.Array, plan: Plan) -> DecodeGroups:
    """Distinct packs of ids (M, k), in increasing order."""
    pack_p = ids_mk.reshape(plan.pairs).astype(jnp.int32) // plan.per_pack
    order = jnp.argsort(pack_p, stable=True)
    sorted_pack = pack_p[order]
    is_new = jnp.concatenate([jnp.ones((1,), bool), sorted_pack[1:] != sorted_pack[:-1]])
    visit_sorted = jnp.cumsum(is_new.astype(jnp.int32)) - 1
    num_live = visit_sorted[-1] + 1
    n_visits = min(plan.pairs, plan.num_packs)
    visit_pack = jnp.full((n_visits,), sorted_pack[-1], jnp.int32).at[visit_sorted].set(sorted_pack)
    visit_of_pair = jnp.zeros((plan.pairs,), jnp.int32).at[order].set(visit_sorted)
    return DecodeGroups(visit_pack=visit_pack, visit_of_pair=visit_of_pair, num_live=num_live)


def decode_weights(coef_mk: jax.Array, ids_mk: jax.Array, dg: DecodeGroups, plan: Plan) -> jax.Array:
    """(V, rows_pad, W) float32: per visit, each token's lane weights for that pack (zero rows for
    tokens that did not choose it). Two choices of one token in one pack own different lanes."""
    slot_p = ids_mk.reshape(plan.pairs).astype(jnp.int32) % plan.per_pack
    token_p = jnp.arange(plan.pairs, dtype=jnp.int32) // plan.choices
    w_pw = lane_weights(coef_mk.reshape(plan.pairs), slot_p, plan)
    w = jnp.zeros((dg.visit_pack.shape[0], plan.rows_pad, plan.width), jnp.float32)
    return w.at[dg.visit_of_pair, token_p].add(w_pw)
