"""The MoE-LoRA op used by `MoELoRALinear`.

Dimensions: M tokens, D in, O out, L adapters, R rank (padded to the largest), k chosen.

Backends:
- "xla" (dense): all adapters as one D x (L*R) matmul, each adapter's R columns scaled by its
  routing weight (zero for adapters not chosen), then one (L*R) x O matmul. Work is
  M*(D + O)*L*R: close to free while L*R is small next to D and O (the MeteoRA case of 28
  adapters of rank 8 on a 4096-wide model), no per-token copy of adapter weights.
- "xla_grouped": (token, choice) pairs sorted by adapter, each adapter's rows cut in chunks
  (`pallas_kernels.grouping.group_chunks`), one small matmul per chunk: work ~ (k*T + live
  adapters * chunk) * R * (D + O), each adapter read about once.
- "xla_gather": reads only the chosen adapters per token; for decode (a few tokens).
- "xla_pairs": one (1 x D) @ (D x R) and (1 x R) @ (R x O) matmul per (token, choice) pair, in a
  loop, each reading its adapter as one contiguous slice; for decode on wide models, where the
  gather's (M, k, D, R) copies cost more than the matmuls.
- "ragged": pairs sorted by adapter, both matmuls as `jax.lax.ragged_dot`. TPU lowers it to a
  native grouped matmul (work ~ k*M*R*(D + O)); CPU and GPU lower it to a masked dense matmul
  with L times that work, so "auto" picks it on TPU only.
- "pallas": the kernels in `pallas_kernels` (TPU Mosaic / GPU Triton; interpret mode on CPU).
- "auto": picks a backend by platform and shape (`choose_backend`); on TPU by the compiled cost
  of the candidates on the chip. Not "pallas": its cost is our own estimate, not the compiler's.

`lora_delta` is the LoRA part alone, by backend (the op adds the base matmul to it;
`meteora_jax.bench.device_check` times it against the kernels).
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec, SingleDeviceSharding

import pallas_kernels
from meteora_jax.chips import chip_of, device_of, xla_counts
from meteora_jax.ops.routing import Routing, RoutingSettings, route
from meteora_jax.sharding import logical_to_spec, partitioned_mesh, per_device
from pallas_kernels.grouping import group_chunks, sort_pairs, tile_rows_for

BACKENDS = ("auto", "xla", "xla_grouped", "xla_gather", "xla_pairs", "ragged", "pallas")
DEFAULT_BACKEND = "auto"  # picked per platform and shape by `choose_backend`
CPU_DENSE_COLUMNS = 64  # on CPU, dense prefill up to this many adapter columns L*R at any size
CPU_GROUP_PAIRS = 4  # on CPU, grouped chunks pay for their loop steps from this many pairs an adapter
CPU_PAIR_FLOATS = 32768  # on CPU, decode loops over pairs once one adapter, R*(D + O), is this large
TPU_CANDIDATES = ("xla", "ragged")  # what "auto" compiles and compares for a TPU prefill


def choose_backend(
    tokens: int, top_k: int, num_adapters: int, d_in: int, d_out: int, rank: int, platform: str | None = None,
    dtype: str = "bfloat16",
) -> str:  # fmt: skip
    """The backend "auto" runs for a shape on `platform` (default: `target_platform()`); `tokens`
    are one device's.

    CPU: decode (<= 16 token-choice pairs) loops over the pairs once one adapter's slice,
    R*(D + O), pays for a loop step (`CPU_PAIR_FLOATS`, except large ranks past 8 pairs, which go
    grouped); narrower models gather small ranks and group large ones. Prefill stays dense for a
    few adapters (L*R <= `CPU_DENSE_COLUMNS`), and for a few tokens (under `CPU_GROUP_PAIRS` pairs
    an adapter) while its extra work L*R*(D + O) is at most the projection's D*O: there the grouped
    loop's fixed cost is not repaid. Beyond, grouped (measurements: docs/backends.md).
    TPU: decode gathers (only the chosen adapters are read); prefill takes the cheaper of
    `TPU_CANDIDATES` as the TPU compiler costs them on the chip (`tpu_seconds`). GPU (no timings
    of ours yet): decode gathers, prefill stays dense (ragged_dot there is a masked dense matmul,
    and a tile loop idles the GPU between launches).
    """
    platform = pallas_kernels.target_platform() if platform is None else platform
    decode = tokens * top_k <= 16
    if platform == "tpu":
        if decode:
            return "xla_gather"
        shape = (tokens, top_k, num_adapters, d_in, d_out, rank, str(jnp.dtype(dtype)))
        return min(TPU_CANDIDATES, key=lambda backend: tpu_seconds(backend, tpu_kind(), *shape))
    if platform == "gpu":
        return "xla_gather" if decode else "xla"
    if decode:
        if rank * (d_in + d_out) >= CPU_PAIR_FLOATS and (rank <= 16 or tokens * top_k <= 8):
            return "xla_pairs"
        return "xla_gather" if rank <= 16 else "xla_grouped"
    columns = num_adapters * rank
    few_tokens = tokens * top_k < CPU_GROUP_PAIRS * num_adapters
    dense = columns <= CPU_DENSE_COLUMNS or (few_tokens and columns * (d_in + d_out) <= d_in * d_out)
    return "xla" if dense else "xla_grouped"


def tpu_kind() -> str:
    """The kind of TPU chip being compiled for: that of the mesh set by `jax.set_mesh` (a topology's,
    when compiling from a CPU host), else of JAX's first device. Works inside a trace. Raises
    ValueError when that is not a TPU."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    device = jax.devices()[0] if device is None else device
    if device.platform != "tpu":
        raise ValueError(
            f"the TPU choice of backend needs a TPU device to compile for, found {device.platform}"
        )
    return device.device_kind


@functools.cache
def tpu_seconds(
    backend: str, kind: str, tokens: int, top_k: int, num_adapters: int, d_in: int, d_out: int, rank: int,
    dtype: str,
) -> float:  # fmt: skip
    """Roofline seconds of `backend`'s LoRA delta, forward and gradient to the input and the routing
    weights (what gate training runs), compiled alone for a TPU of `kind` with one device's `tokens`."""
    delta = _DELTAS[backend]

    def loss(x_md, weights_mk, ids_mk, a_ldr, b_lro, scale_l):
        y_mo = delta(x_md, a_ldr, b_lro, Routing(ids=ids_mk, weights=weights_mk), scale_l)
        return y_mo.astype(jnp.float32).sum()

    one = SingleDeviceSharding(device_of(kind))
    shapes = [
        ((tokens, d_in), dtype), ((tokens, top_k), "float32"), ((tokens, top_k), "int32"),
        ((num_adapters, d_in, rank), dtype), ((num_adapters, rank, d_out), dtype),
        ((num_adapters,), "float32"),
    ]  # fmt: skip
    args = [jax.ShapeDtypeStruct(shape, jnp.dtype(t), sharding=one) for shape, t in shapes]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    # On a thread of its own: outside the caller's trace and mesh, which JAX keeps per thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        compiled = pool.submit(lambda: step.lower(*args).compile()).result()
    return chip_of(kind).roofline_seconds(*xla_counts(compiled))


def pair_coefficients(routing: Routing, scale_l: jax.Array) -> jax.Array:
    """(M, k) multiplier of each chosen adapter's LoRA output: routing weight * LoRA scale."""
    return routing.weights * scale_l.astype(routing.weights.dtype)[routing.ids]


def combine_weights(routing: Routing, scale_l: jax.Array, num_adapters: int) -> jax.Array:
    """(M, L) per-adapter multipliers: routing weight * LoRA scale, zero for unchosen adapters."""
    one_hot_mkl = jax.nn.one_hot(routing.ids, num_adapters, dtype=routing.weights.dtype)
    return jnp.einsum("mk,mkl->ml", routing.weights, one_hot_mkl) * scale_l.astype(routing.weights.dtype)


def _dense_delta(x_md, a_ldr, b_lro, coef_ml):
    h_mlr = jnp.einsum("md,ldr->mlr", x_md, a_ldr.astype(x_md.dtype))
    h_mlr = h_mlr * coef_ml.astype(x_md.dtype)[:, :, None]
    return jnp.einsum("mlr,lro->mo", h_mlr, b_lro.astype(x_md.dtype))


def _gather_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    """Reads only the chosen adapters: (M, k, D, R) and (M, k, R, O) gathers. For decode (small M)."""
    coef_mk = pair_coefficients(routing, scale_l)
    h_mkr = jnp.einsum("md,mkdr->mkr", x_md, a_ldr.astype(x_md.dtype)[routing.ids])
    h_mkr = h_mkr * coef_mk.astype(x_md.dtype)[:, :, None]
    return jnp.einsum("mkr,mkro->mo", h_mkr, b_lro.astype(x_md.dtype)[routing.ids])


def _pairs_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    """One pair (token t, choice j) per loop step: y[t] += coef * (x[t] @ A[id]) @ B[id]. The loop
    has a static trip count (M * k), so reverse-mode differentiation works."""
    m, k = routing.ids.shape
    o = b_lro.shape[-1]
    coef_mk = pair_coefficients(routing, scale_l).astype(x_md.dtype)
    a_ldr, b_lro = a_ldr.astype(x_md.dtype), b_lro.astype(x_md.dtype)

    def pair(p, y_mo):
        t, j = p // k, p % k
        adapter = routing.ids[t, j]
        x_1d = jax.lax.dynamic_slice_in_dim(x_md, t, 1)
        h_1r = jnp.dot(x_1d, jax.lax.dynamic_index_in_dim(a_ldr, adapter, keepdims=False)) * coef_mk[t, j]
        part_1o = jnp.dot(h_1r, jax.lax.dynamic_index_in_dim(b_lro, adapter, keepdims=False))
        row_1o = jax.lax.dynamic_slice_in_dim(y_mo, t, 1)
        return jax.lax.dynamic_update_slice_in_dim(y_mo, row_1o + part_1o, t, 0)

    return jax.lax.fori_loop(0, m * k, pair, jnp.zeros((m, o), x_md.dtype))


def _grouped_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    """Pairs sorted by adapter, each adapter's rows in chunks of tm: one (tm x D) @ (D x R) and
    (tm x R) @ (R x O) matmul per chunk, so an adapter with at most tm rows is read once.

    Dead chunks are skipped with lax.cond; the loops have static trip counts, so reverse-mode
    differentiation works.
    """
    m, _ = x_md.shape
    n_adapters, _, r = a_ldr.shape
    o = b_lro.shape[-1]
    k = routing.ids.shape[-1]
    tm = tile_rows_for(m * k, n_adapters)
    chunks = group_chunks(routing.ids, n_adapters, tm)
    pairs = chunks.pairs
    # Padded by one chunk: a chunk's tm rows from its start never run past the end.
    coef_p = pair_coefficients(routing, scale_l).reshape(m * k)[pairs.order]
    coef_p = jnp.pad(coef_p.astype(x_md.dtype), (0, tm))
    tokens_p = jnp.pad(pairs.sorted_token, (0, tm))
    a_ldr, b_lro = a_ldr.astype(x_md.dtype), b_lro.astype(x_md.dtype)
    n_chunks = chunks.chunk_group.shape[0]

    def shrink(c, h_pr):
        def live(h_pr):
            start = chunks.chunk_start[c]
            rows_td = x_md[jax.lax.dynamic_slice(tokens_p, (start,), (tm,))]
            part_tr = jnp.dot(rows_td, a_ldr[chunks.chunk_group[c]])
            part_tr = part_tr * jax.lax.dynamic_slice(coef_p, (start,), (tm,))[:, None]
            cur = jax.lax.dynamic_slice(h_pr, (start, 0), (tm, r))  # the next group's rows stay
            return jax.lax.dynamic_update_slice(
                h_pr, jnp.where(chunks.row_mask(c)[:, None], part_tr, cur), (start, 0)
            )

        return jax.lax.cond(c < chunks.num_chunks, live, lambda h: h, h_pr)

    h_pr = jax.lax.fori_loop(0, n_chunks, shrink, jnp.zeros((m * k + tm, r), x_md.dtype))

    def expand(c, y_mo):
        # Scatter-add straight into (M, O): a sorted (P, O) buffer would exceed O(T * (L*R + k*D)).
        def live(y_mo):
            start = chunks.chunk_start[c]
            rows_tr = jax.lax.dynamic_slice(h_pr, (start, 0), (tm, r))
            rows_tr = jnp.where(chunks.row_mask(c)[:, None], rows_tr, 0)
            part_to = jnp.dot(rows_tr, b_lro[chunks.chunk_group[c]])
            return y_mo.at[jax.lax.dynamic_slice(tokens_p, (start,), (tm,))].add(part_to)

        return jax.lax.cond(c < chunks.num_chunks, live, lambda y: y, y_mo)

    return jax.lax.fori_loop(0, n_chunks, expand, jnp.zeros((m, o), x_md.dtype))


def _ragged_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    """Pairs sorted by adapter, (P x D) @ A and (P x R) @ B as ragged_dot over the adapter groups,
    then each token's k rows summed back in token order (a gather, not a scatter-add)."""
    m, k = routing.ids.shape
    pairs = sort_pairs(routing.ids, a_ldr.shape[0])
    coef_p = pair_coefficients(routing, scale_l).reshape(m * k)[pairs.order].astype(x_md.dtype)
    h_pr = jax.lax.ragged_dot(x_md[pairs.sorted_token], a_ldr.astype(x_md.dtype), pairs.group_sizes)
    y_po = jax.lax.ragged_dot(h_pr * coef_p[:, None], b_lro.astype(x_md.dtype), pairs.group_sizes)
    rank_p = jnp.zeros((m * k,), jnp.int32).at[pairs.order].set(jnp.arange(m * k, dtype=jnp.int32))
    return y_po[rank_p].reshape(m, k, -1).sum(axis=1)


def _pallas_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    coef_mk = pair_coefficients(routing, scale_l)
    return pallas_kernels.moe_lora_delta(x_md, a_ldr, b_lro, routing.ids, coef_mk)


def _routed_dense_delta(x_md, a_ldr, b_lro, routing: Routing, scale_l):
    return _dense_delta(x_md, a_ldr, b_lro, combine_weights(routing, scale_l, a_ldr.shape[0]))


_DELTAS = {"xla": _routed_dense_delta, "ragged": _ragged_delta}  # the candidates `tpu_seconds` costs


def _device_rows(x_md: jax.Array) -> int:
    """How many of x's rows each device holds under the partitioned mesh (all of them without)."""
    mesh = partitioned_mesh()
    if mesh is None:
        return x_md.shape[0]
    axes = logical_to_spec(("batch", None), x_md.shape, mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return x_md.shape[0] // int(np.prod([mesh.shape[a] for a in axes]))


def _on_row_shards(delta_fn, x_md, a_ldr, b_lro, routing: Routing, scale_l):
    """`delta_fn` on each device's tokens under a mesh. The sorting backends order all M tokens by
    adapter, and a Pallas call is opaque to XLA's partitioner: either would otherwise run over
    the tokens of every data shard gathered onto each device. The adapters go whole to every
    device (as FSDP gathers weights); their gradients are summed back over the mesh."""
    mesh = partitioned_mesh()
    rows = None if mesh is None else logical_to_spec(("batch", None), x_md.shape, mesh)[0]
    routing = Routing(ids=routing.ids, weights=routing.weights)  # the logits are not needed here
    if rows is None:
        return delta_fn(x_md, a_ldr, b_lro, routing, scale_l)
    row, whole = PartitionSpec(rows, None), PartitionSpec()
    in_specs = (row, whole, whole, Routing(ids=row, weights=row), whole)
    return per_device(delta_fn, mesh, in_specs, row)(x_md, a_ldr, b_lro, routing, scale_l)


def lora_delta(
    x_md: jax.Array,
    a_ldr: jax.Array,
    b_lro: jax.Array,
    routing: Routing,
    scale_l: jax.Array,
    *,
    backend: str = DEFAULT_BACKEND,
) -> jax.Array:
    """The LoRA part of the MeteoRA linear: sum_j w_j * s_{id_j} * (x @ A_{id_j}) @ B_{id_j}.

    x_md: (M, D) in the compute dtype; A (L, D, R); B (L, R, O); routing: ids / weights (M, k);
    scale (L,). backend: one of `BACKENDS` ("auto" resolves by shape with `choose_backend`).
    Returns delta (M, O) in x's dtype. Raises ValueError for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        n_adapters, d_in, rank = a_ldr.shape
        top_k, d_out = routing.ids.shape[-1], b_lro.shape[-1]
        backend = choose_backend(
            _device_rows(x_md), top_k, n_adapters, d_in, d_out, rank, dtype=str(x_md.dtype)
        )
    if backend == "xla_gather":
        return _gather_delta(x_md, a_ldr, b_lro, routing, scale_l)
    if backend == "xla_grouped":
        return _on_row_shards(_grouped_delta, x_md, a_ldr, b_lro, routing, scale_l)
    if backend == "xla_pairs":
        return _pairs_delta(x_md, a_ldr, b_lro, routing, scale_l)
    if backend == "ragged":
        return _on_row_shards(_ragged_delta, x_md, a_ldr, b_lro, routing, scale_l)
    if backend == "pallas":
        return _on_row_shards(_pallas_delta, x_md, a_ldr, b_lro, routing, scale_l)
    return _routed_dense_delta(x_md, a_ldr, b_lro, routing, scale_l)


def moe_lora(
    x_md: jax.Array,
    kernel_do: jax.Array,
    gate_dl: jax.Array,
    a_ldr: jax.Array,
    b_lro: jax.Array,
    scale_l: jax.Array,
    settings: RoutingSettings,
    *,
    backend: str = DEFAULT_BACKEND,
    lora_x_md: jax.Array | None = None,
    forced_m: jax.Array | None = None,
    choice_noise_ml: jax.Array | None = None,
) -> tuple[jax.Array, Routing]:
    """The MeteoRA linear: base projection plus the gate-weighted top-k LoRA experts.

    x_md: (M, D) in the compute dtype; kernel (D, O); gate (D, L); A (L, D, R); B (L, R, O);
    scale (L,). lora_x_md: the LoRA input if it differs from x (dropout in training).
    forced_m: (M,) adapter per token bypassing the gate (-1: base only). choice_noise_ml: (M, L)
    noise on the logits for the top-k choice only (`route`).
    Returns y (M, O) in x's dtype and the Routing. Raises ValueError for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    routing = route(x_md, gate_dl, settings, forced_m, settings.gated_rows, choice_noise_ml)
    lora_x = x_md if lora_x_md is None else lora_x_md
    delta = lora_delta(lora_x, a_ldr, b_lro, routing, scale_l, backend=backend)
    y_mo = jnp.dot(x_md, kernel_do.astype(x_md.dtype)) + delta
    return y_mo.astype(x_md.dtype), routing
