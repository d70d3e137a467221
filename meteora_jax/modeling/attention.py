"""Scaled dot-product attention behind one function, by platform: XLA, cuDNN flash attention
(GPU) and the Pallas splash-attention kernel (TPU; interpret mode on CPU).

Dimensions: B batch, T queries, S key/value slots, N query heads, K key/value heads
(G = N / K per group), H head dim.

Every implementation computes softmax(q k^T / sqrt(H) + mask) v with float32 logits. They take
the mask in different forms (`AttentionMask`): XLA the explicit (B, T, S) mask, which any call
with a KV cache needs; the fused kernels, for self-attention over the new tokens alone, its
structure (causal within segments), applied block by block without ever building a (T, S)
matrix. The two agree on every real token; a padding query (segment 0) sees other padding under
the structured form and nothing under the explicit one, so outputs at padding positions (which
no real token reads) may differ.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meteora_jax.sharding import logical_to_spec, partitioned_mesh, per_device
from pallas_kernels import target_platform

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
DEFAULT_ATTENTION = "auto"  # picked per platform, dtype and shape by `resolve_attention`
SPLASH_BLOCK = 128  # splash attention's query / key block: T must be a multiple of it
# XLA attends longer query runs in blocks of this many queries, each block recomputed in the
# backward pass, so the float32 (N, T, S) logits never exist whole: N * 512 * S per block instead
# (at 4096 tokens and 32 heads, 256 MiB instead of 2 GiB per batch row).
XLA_QUERY_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """What each query may attend to, in the form its implementation (resolved, static) takes;
    the other form is None.

    allowed_bts: (B, T, S) bool, the explicit mask (causal, padding, segments, cache slots): "xla".
    segment_ids_bt: (B, T) int32, self-attention without a cache: query t sees key s <= t with
    the same id (0 marks padding): "cudnn" and "splash".
    """

    allowed_bts: jax.Array | None = None
    segment_ids_bt: jax.Array | None = None
    implementation: str = dataclasses.field(metadata=dict(static=True), default="xla")


def resolve_attention(
    implementation: str, *, dtype, head_dim: int, length: int, cached: bool, platform: str | None = None
) -> str:
    """The implementation a forward pass runs.

    "auto" picks by `platform` (default: `target_platform()`, that of the mesh's devices): cuDNN
    flash attention on GPU for bfloat16 / float16 with a head dim cuDNN takes (<= 128, a multiple
    of 8), splash attention on TPU, XLA otherwise (on CPU XLA is the only compiled path). A
    kernel, chosen or named, gives way to XLA where it cannot run: over a KV cache (decode is a
    few queries, where the explicit mask costs nothing) and, for splash, at a length off its block
    (evaluation prompts, say); training refuses a --seq-len off the block up front
    (`check_training_length`).

    Raises ValueError for an unknown implementation.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not one of {IMPLEMENTATIONS}")
    platform = target_platform() if platform is None else platform
    if implementation == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if platform == "gpu" and half and head_dim <= 128 and head_dim % 8 == 0:
            implementation = "cudnn"
        elif platform == "tpu":
            implementation = "splash"
        else:
            return "xla"
    if cached or (implementation == "splash" and length % SPLASH_BLOCK):
        return "xla"
    return implementation


def check_training_length(implementation: str, seq_len: int) -> None:
    """Refuses `--attention splash` with a training length splash cannot take (ValueError naming
    both), where XLA would otherwise run every step without saying so."""
    if implementation == "splash" and seq_len % SPLASH_BLOCK:
        raise ValueError(f"--attention splash needs --seq-len a multiple of {SPLASH_BLOCK}, got {seq_len}")


def _splash(q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """Causal splash attention within segments, vmapped over the batch (heads-major layout);
    Pallas interpret mode off TPU (how CPU tests run it)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415  (TPU-only module)
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_mask as masks,
    )

    _, t, n, h = q_btnh.shape
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n)])
    block = SPLASH_BLOCK
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=target_platform() != "tpu"
    )

    def one(q_nth, k_kth, v_kth, seg_t):
        return kernel(q_nth * (h**-0.5), k_kth, v_kth, segment_ids=splash.SegmentIds(q=seg_t, kv=seg_t))

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (B, T, N, H) <-> (B, N, T, H)
    out_bnth = jax.vmap(one)(heads_first(q_btnh), heads_first(k_btkh), heads_first(v_btkh), segment_ids_bt)
    return heads_first(out_bnth)


def _splash_sharded(q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """`_splash` per device under an active mesh: a Pallas call is opaque to XLA's partitioner,
    which would otherwise run it on inputs gathered whole onto every device. Each device takes its
    rows (the batch axes) and, where both head counts split alike over `tensor`, its heads; query
    head i of a shard then still reads that shard's key head i // G. Without a mesh, one call."""
    mesh = partitioned_mesh()
    if mesh is None:
        return _splash(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q_btnh.shape, mesh)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_btkh.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # heads split unlike kv heads: keep every head on every shard
        q_spec = kv_spec = PartitionSpec(q_spec[0], None, None, None)
    in_specs = (q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None))
    return per_device(_splash, mesh, in_specs, q_spec)(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask: AttentionMask) -> jax.Array:
    """Grouped-query attention of q (B, T, N, H) over k, v (B, S, K, H) under `mask`, by its
    implementation; returns (B, T, N, H) in q's dtype."""
    k_bskh, v_bskh = k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype)
    if mask.implementation == "splash":
        return _splash_sharded(q_btnh, k_bskh, v_bskh, mask.segment_ids_bt).astype(q_btnh.dtype)
    if mask.implementation == "cudnn":
        seg_bt = mask.segment_ids_bt
        same_b1ts = (seg_bt[:, :, None] == seg_bt[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask=same_b1ts, is_causal=True, implementation="cudnn"
        )
    return _xla_blocked(q_btnh, k_bskh, v_bskh, mask.allowed_bts)


def _xla(q_btnh, k_bskh, v_bskh, allowed_bts):
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=allowed_bts[:, None], implementation="xla"
    )


def _xla_blocked(q_btnh, k_bskh, v_bskh, allowed_bts, block: int = XLA_QUERY_BLOCK):
    """XLA attention, in blocks of `block` queries past that length (`XLA_QUERY_BLOCK`). Each
    query row's softmax still spans all S slots, so blocking changes no value."""
    b, t, n, h = q_btnh.shape
    if t <= block:
        return _xla(q_btnh, k_bskh, v_bskh, allowed_bts)
    blocks = -(-t // block)
    pad = blocks * block - t  # padded queries see nothing and are cut off below
    q_cbtnh = (
        jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, block, n, h).swapaxes(0, 1)
    )
    allowed_cbts = (
        jnp.pad(allowed_bts, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, block, -1).swapaxes(0, 1)
    )

    @jax.checkpoint
    def one(block_inputs):
        q_bqnh, allowed_bqs = block_inputs
        return _xla(q_bqnh, k_bskh, v_bskh, allowed_bqs)

    out_cbtnh = jax.lax.map(one, (q_cbtnh, allowed_cbts))
    return out_cbtnh.swapaxes(0, 1).reshape(b, blocks * block, n, h)[:, :t]
