"""Group metadata for grouped matmuls: (token, choice) pairs sorted by group, cut in row tiles.

Dimensions: M tokens, k choices per token, P = M*k pairs, L groups, tm rows per tile, V visits.
Pure jnp with static shapes, so it runs anywhere (CPU tests, XLA paths, and as the
scalar-prefetch metadata of the Pallas kernels). Two cuts of the sorted pairs:

- `group_metadata` (the Pallas kernels, whose groups are packs of adapters,
  `pallas_kernels.metadata`): the sorted rows are cut into fixed tiles of `tm` rows; a tile that
  holds rows of several groups is visited once per group (rows of other groups masked), as in
  megablox: V = ceil(P / tm) + L - 1 visits always suffice, `num_visits` <= V are live.
- `group_chunks` (the XLA grouped path of `meteora_jax.ops.moe_lora`, whose groups are
  adapters): each group's rows are cut on their own into chunks of `tm` rows, so a chunk never
  spans two groups and a group no larger than `tm` is read once, not once per tile it touches
  (where a loop step's cost is reading the adapter, as on CPU). V = L + P // tm chunks suffice.

Work is ~ (P + live groups * tm) * rank either way, instead of M * L * rank for the dense form.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """Sorted pairs and the tile visits over them.

    order: (P,) pair index of each sorted row; sorted_token / sorted_adapter: (P,) the token
    and group (adapter, or pack) of each sorted row; group_sizes / group_starts: (L,) rows per
    group and where they start; visit_tile / visit_adapter: (V,) the tile and group of each
    visit; num_visits: () how many visits are live.
    """

    order: jax.Array
    sorted_token: jax.Array
    sorted_adapter: jax.Array
    group_sizes: jax.Array
    group_starts: jax.Array
    visit_tile: jax.Array
    visit_adapter: jax.Array
    num_visits: jax.Array
    tile_rows: int = dataclasses.field(metadata=dict(static=True), default=128)


def tile_rows_for(num_pairs: int, num_groups: int, *, lo: int = 8, hi: int = 128) -> int:
    """Rows per tile: about the mean group size (so spread routing wastes little), a power of two."""
    mean = max(1, num_pairs // max(1, num_groups))
    tm = lo
    while tm * 2 <= min(mean, hi):
        tm *= 2
    return tm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedPairs:
    """(token, choice) pairs sorted by group: order (P,) the pair index of each sorted row,
    sorted_token / sorted_group (P,) its token and group, group_sizes (L,) rows per group."""

    order: jax.Array
    sorted_token: jax.Array
    sorted_group: jax.Array
    group_sizes: jax.Array


def sort_pairs(ids_mk: jax.Array, num_groups: int) -> SortedPairs:
    """Sorts the (token, choice) pairs of `ids_mk` (M, k) by group id (stable: by token within a group)."""
    m, k = ids_mk.shape
    pair_group = ids_mk.reshape(m * k).astype(jnp.int32)
    order = jnp.argsort(pair_group, stable=True).astype(jnp.int32)
    return SortedPairs(
        order=order,
        sorted_token=(order // k).astype(jnp.int32),
        sorted_group=pair_group[order],
        group_sizes=jnp.bincount(pair_group, length=num_groups).astype(jnp.int32),
    )


def group_metadata(ids_mk: jax.Array, num_groups: int, tile_rows: int) -> GroupMetadata:
    """Sorts the (token, choice) pairs of `ids_mk` (M, k) by group id and lists the tile visits."""
    m, k = ids_mk.shape
    p = m * k
    pairs = sort_pairs(ids_mk, num_groups)
    order, sorted_group, sorted_token = pairs.order, pairs.sorted_group, pairs.sorted_token
    group_sizes = pairs.group_sizes
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes

    # Tiles each non-empty group touches: [first, last], inclusive.
    nonempty = group_sizes > 0
    first = group_starts // tile_rows
    last = (group_ends - 1) // tile_rows
    visits_per_group = jnp.where(nonempty, last - first + 1, 0)
    num_tiles = -(-p // tile_rows)
    max_visits = num_tiles + num_groups - 1
    visit_offsets = jnp.cumsum(visits_per_group) - visits_per_group  # (L,)
    num_visits = jnp.sum(visits_per_group)

    # Visit v belongs to the group g whose offset range holds v; later visits repeat the last live one.
    v = jnp.arange(max_visits, dtype=jnp.int32)
    live_v = jnp.minimum(v, num_visits - 1)
    group_of_visit = jnp.searchsorted(visit_offsets + visits_per_group, live_v, side="right").astype(
        jnp.int32
    )
    group_of_visit = jnp.minimum(group_of_visit, num_groups - 1)
    visit_tile = (first[group_of_visit] + live_v - visit_offsets[group_of_visit]).astype(jnp.int32)
    return GroupMetadata(
        order=order,
        sorted_token=sorted_token,
        sorted_adapter=sorted_group,
        group_sizes=group_sizes,
        group_starts=group_starts,
        visit_tile=visit_tile,
        visit_adapter=group_of_visit,
        num_visits=num_visits.astype(jnp.int32),
        tile_rows=tile_rows,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupChunks:
    """Sorted pairs cut, group by group, into chunks of `tile_rows` rows.

    pairs: the sorted pairs; chunk_group / chunk_start / chunk_end: (V,) each chunk's group, its
    first sorted row and the end of its group's rows; num_chunks: () how many chunks are live (the
    others repeat the last live one).
    """

    pairs: SortedPairs
    chunk_group: jax.Array
    chunk_start: jax.Array
    chunk_end: jax.Array
    num_chunks: jax.Array
    tile_rows: int = dataclasses.field(metadata=dict(static=True), default=16)

    def row_mask(self, chunk: jax.Array) -> jax.Array:
        """(tm,) which of the `tile_rows` rows from a chunk's start are its group's (none when dead)."""
        rows = self.chunk_start[chunk] + jnp.arange(self.tile_rows)
        return (rows < self.chunk_end[chunk]) & (chunk < self.num_chunks)


def group_chunks(ids_mk: jax.Array, num_groups: int, tile_rows: int) -> GroupChunks:
    """Sorts the (token, choice) pairs of `ids_mk` (M, k) by group id and cuts each group's rows
    into chunks of `tile_rows`: sum ceil(size / tm) <= L + P // tm of them."""
    m, k = ids_mk.shape
    pairs = sort_pairs(ids_mk, num_groups)
    sizes = pairs.group_sizes
    ends = jnp.cumsum(sizes)
    chunks = -(-sizes // tile_rows)  # (L,) chunks of each group
    offsets = jnp.cumsum(chunks) - chunks
    num_chunks = jnp.sum(chunks)
    c = jnp.minimum(jnp.arange(num_groups + m * k // tile_rows, dtype=jnp.int32), num_chunks - 1)
    group = jnp.searchsorted(offsets + chunks, c, side="right").astype(jnp.int32)
    group = jnp.minimum(group, num_groups - 1)
    start = ends[group] - sizes[group] + (c - offsets[group]) * tile_rows
    return GroupChunks(
        pairs=pairs,
        chunk_group=group,
        chunk_start=start.astype(jnp.int32),
        chunk_end=ends[group].astype(jnp.int32),
        num_chunks=num_chunks.astype(jnp.int32),
        tile_rows=tile_rows,
    )
