"""The LLaMA causal LM as Flax NNX modules.

Dimensions: B batch, T tokens in this call, S key/value slots (T, or the cache length),
D model, F mlp, N query heads, K key/value heads, G = N / K groups, H head dim, V vocab,
Y decoder layers.

Decoder layers are stored stacked (every layer parameter has a leading Y axis, logical
name "layers"), built with `nnx.vmap`; the forward pass either scans them with
`jax.lax.scan` (compile time independent of depth) or unrolls a Python loop. Both read the
same parameters, so a checkpoint loads into either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.modeling.attention import DEFAULT_ATTENTION, AttentionMask, attend, resolve_attention
from meteora_jax.modeling.meteora_linear import (
    NO_ROUTING_NOISE,
    ForwardContext,
    GateStats,
    MoELoRALinear,
    project,
)
from meteora_jax.modeling.rope import apply_rope, rope_tables
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND
from meteora_jax.ops.routing import Routing, RoutingSettings
from meteora_jax.sharding import constrain

# Rematerialisation of a decoder layer in training: what its backward pass may keep.
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
    "full": jax.checkpoint_policies.nothing_saveable,  # keep the layer input, recompute the rest
}
# What the gate loss's gradient reaches: each gate alone ("gates"), or everything upstream too.
GATE_LOSS_GRADS = ("gates", "all")
DEFAULT_REMAT, DEFAULT_GATE_LOSS_GRAD = "none", "gates"  # of a module until `configure_training`


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """(B, T) positions that restart at 0 at every new segment (packed samples; 0 on padding)."""
    b, t = segment_ids_bt.shape
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts_bt = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=-1
    )
    first_bt = jax.lax.cummax(jnp.where(starts_bt, idx_bt, 0), axis=1)
    return jnp.where(segment_ids_bt > 0, idx_bt - first_bt, 0)


INIT_STD = 0.02  # normal init of every weight matrix (transformers' default initializer_range)


def _param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype, std: float = INIT_STD):
    init = nnx.initializers.normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel, kernel (in, out) in JAX layout (torch stores (out, in))."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """RMS norm computed in float32, rounded to the input dtype before the scale (as HF)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def _projection(name, d_in, d_out, axes, moe: MoELoRAConfig | None, *, dtype, param_dtype, backend, rngs):
    """A MeteoRA layer where the mixture targets this projection, else a plain Linear."""
    if moe is not None and name in moe.targets:
        return MoELoRALinear(
            name, d_in, d_out, axes, moe, dtype=dtype, param_dtype=param_dtype, backend=backend, rngs=rngs
        )
    return Linear(d_in, d_out, axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention takes beside its hidden states, the same for all layers: the
    RoPE tables (B, T, H), the mask and, with a KV cache, the slot the new keys are written at."""

    cos_bth: jax.Array
    sin_bth: jax.Array
    mask: AttentionMask
    write_index: jax.Array | None = None


class Attention(nnx.Module):
    """Grouped-query attention over `S` key/value slots under an `AttentionMask`."""

    def __init__(self, config: LlamaConfig, moe: MoELoRAConfig | None, **kw):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = _projection("q_proj", d, n * h, ("embed", "heads"), moe, **kw)
        self.k_proj = _projection("k_proj", d, k * h, ("embed", "kv_heads"), moe, **kw)
        self.v_proj = _projection("v_proj", d, k * h, ("embed", "kv_heads"), moe, **kw)
        self.o_proj = _projection("o_proj", n * h, d, ("heads", "embed"), moe, **kw)
        self.shape_nkh = (n, k, h)
        self.dtype = kw["dtype"]

    def __call__(self, x_btd, ctx: ForwardContext, inputs: AttentionInputs, kv_cache=None):
        """Returns (out (B, T, D), updated (k, v) cache or None).

        kv_cache: optional (k (B, S, K, H), v (B, S, K, H)); the new keys/values are written at
        slot `inputs.write_index` and attention runs over all S slots under `inputs.mask`.
        """
        b, t, _ = x_btd.shape
        n, k, h = self.shape_nkh
        rope = (inputs.cos_bth, inputs.sin_bth)
        q_btnh = apply_rope(project(self.q_proj, "q_proj", x_btd, ctx).reshape(b, t, n, h), *rope)
        k_btkh = apply_rope(project(self.k_proj, "k_proj", x_btd, ctx).reshape(b, t, k, h), *rope)
        v_btkh = project(self.v_proj, "v_proj", x_btd, ctx).reshape(b, t, k, h)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_bskh = jax.lax.dynamic_update_slice(
                k_cache, k_btkh.astype(k_cache.dtype), (0, inputs.write_index, 0, 0)
            )
            v_bskh = jax.lax.dynamic_update_slice(
                v_cache, v_btkh.astype(v_cache.dtype), (0, inputs.write_index, 0, 0)
            )
            kv_cache = (k_bskh, v_bskh)
        else:
            k_bskh, v_bskh = k_btkh, v_btkh
        out_btnh = attend(q_btnh.astype(self.dtype), k_bskh, v_bskh, inputs.mask)
        return project(self.o_proj, "o_proj", out_btnh.reshape(b, t, n * h), ctx), kv_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, moe: MoELoRAConfig | None, **kw):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _projection("gate_proj", d, f, ("embed", "mlp"), moe, **kw)
        self.up_proj = _projection("up_proj", d, f, ("embed", "mlp"), moe, **kw)
        self.down_proj = _projection("down_proj", f, d, ("mlp", "embed"), moe, **kw)

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext) -> jax.Array:
        hidden = jax.nn.silu(project(self.gate_proj, "gate_proj", x_btd, ctx))
        hidden = hidden * project(self.up_proj, "up_proj", x_btd, ctx)
        return project(self.down_proj, "down_proj", hidden, ctx)


class DecoderLayer(nnx.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    def __init__(self, config: LlamaConfig, moe: MoELoRAConfig | None, *, dtype, param_dtype, backend, rngs):
        self.input_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, backend=backend, rngs=rngs)
        self.self_attn = Attention(config, moe, **kw)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp = MLP(config, moe, **kw)

    def __call__(self, x_btd, ctx: ForwardContext, inputs: AttentionInputs, kv_cache=None):
        attn, kv_cache = self.self_attn(self.input_layernorm(x_btd), ctx, inputs, kv_cache)
        x_btd = constrain(x_btd + attn, ("batch", "length", "embed"))
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd), ctx)
        return constrain(x_btd, ("batch", "length", "embed")), kv_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for S slots, and which slots hold real (non-pad) tokens.

    Rows share one write position (`index`), so batches are left-padded; `valid` masks pads.
    """

    k: jax.Array  # (Y, B, S, K, H)
    v: jax.Array  # (Y, B, S, K, H)
    valid: jax.Array  # (B, S) bool
    index: jax.Array  # () int32, next slot to write

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalLMOutput:
    """Model output.

    logits: (B, T, V) in the compute dtype, or None when the call skipped the LM head (`head=
    False`), which leaves `hidden`, the final normed states (B, T, D), for a loss that applies
    `head_kernel()` a chunk at a time. cache: the updated KVCache or None; routing:
    {"layers.{i}.{projection}": Routing} with ids / weights (B, T, k) and, when asked, the
    raw gate logits (B, T, L); None unless requested. gate_stats: with gate labels (training),
    {projection: GateStats} whose fields are (Y,) arrays, one value per decoder layer.
    """

    logits: jax.Array | None
    cache: KVCache | None = None
    routing: dict[str, Routing] | None = None
    gate_stats: dict[str, GateStats] | None = None  # projection -> GateStats of (Y,) per layer
    hidden: jax.Array | None = None  # (B, T, D) final normed states, when the head was skipped


class LlamaForCausalLM(nnx.Module):
    """LLaMA decoder-only LM, optionally with MeteoRA layers (`moe`) in the targeted projections.

    `scan_layers` only changes how the forward pass walks the stacked layers; `attention` picks
    the attention implementation (`meteora_jax.modeling.attention.IMPLEMENTATIONS`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        moe: MoELoRAConfig | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = True,
        backend: str = DEFAULT_BACKEND,
        attention: str = DEFAULT_ATTENTION,
        rngs: nnx.Rngs,
    ):
        resolve_attention(attention, dtype=dtype, head_dim=config.head_dim, length=0, cached=False)
        self.attention = attention
        self.config = config
        self.remat = DEFAULT_REMAT
        self.gate_loss_grad = DEFAULT_GATE_LOSS_GRAD
        self.routing_noise = NO_ROUTING_NOISE
        self.moe = moe
        self.dtype = dtype
        self.scan_layers = scan_layers
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(INIT_STD)(rngs.params(), (v, d), param_dtype),
            logical_axes=("vocab", "embed"),
        )

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(
            in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}
        )
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, moe, dtype=dtype, param_dtype=param_dtype, backend=backend, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(d, v, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def configure_training(
        self,
        *,
        remat: str = DEFAULT_REMAT,
        gate_loss_grad: str = DEFAULT_GATE_LOSS_GRAD,
        routing_noise: float = NO_ROUTING_NOISE,
    ) -> None:
        """Training-only settings of the forward pass. remat: what each decoder layer keeps for
        the backward pass (`REMAT_POLICIES`); gate_loss_grad: "gates" holds each gate's input
        constant in the gate loss (its gradient reaches the gates only), "all" lets it flow
        upstream (`GATE_LOSS_GRADS`); routing_noise: the scale of Gumbel noise on the gate logits
        when a call with a `dropout_rng` chooses its top-k (0: off)."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
        if gate_loss_grad not in GATE_LOSS_GRADS:
            raise ValueError(f"gate_loss_grad={gate_loss_grad!r} is not one of {GATE_LOSS_GRADS}")
        if not (isinstance(routing_noise, int | float) and 0 <= routing_noise < float("inf")):
            raise ValueError(f"routing_noise={routing_noise!r} is not a finite number >= 0")
        self.remat = remat
        self.gate_loss_grad = gate_loss_grad
        self.routing_noise = float(routing_noise)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        routing: RoutingSettings | None = None,
        return_routing: bool = False,
        dropout_rng: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        gate_labels: jax.Array | None = None,
        head: bool = True,
    ) -> CausalLMOutput:
        """Forward pass over input_ids (B, T).

        attention_mask: (B, T), 1 for real tokens, 0 for (left) padding. positions: (B, T);
        by default each row counts its real tokens (so a left-padded row equals its unpadded
        self). cache: a KVCache to extend; the new tokens go at slots [index, index + T).
        routing: top-k / temperature (default: the MoE config's); return_routing: add the
        per-projection routing to the output; dropout_rng: enables LoRA dropout (training).
        segment_ids: (B, T) packed rows (training): tokens attend only within their own
        segment, 0 marks padding, and positions restart per segment unless given; replaces
        attention_mask and excludes a cache. gate_labels: (B, T) task label per token (-1: none)
        for the MeteoRA gate loss, returned as `gate_stats` (`configure_training` sets what its
        gradient reaches). head=False skips the LM head: `.hidden` instead of `.logits`
        (training's chunked cross entropy).
        """
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids replace attention_mask and cannot be used with a cache")
            attention_mask = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)
        mask_bt = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            valid_bs, q_slots, write_index = mask_bt, jnp.arange(t), None
            seen_b = jnp.zeros((b,), jnp.int32)
        else:
            write_index = cache.index
            valid_bs = jax.lax.dynamic_update_slice(cache.valid, mask_bt, (0, write_index))
            q_slots = write_index + jnp.arange(t)
            seen_b = cache.valid.sum(axis=-1, dtype=jnp.int32)
        if positions is None:
            positions = seen_b[:, None] + jnp.cumsum(mask_bt, axis=-1, dtype=jnp.int32) - 1
            positions = jnp.maximum(positions, 0)
        implementation = resolve_attention(
            self.attention,
            dtype=self.dtype,
            head_dim=self.config.head_dim,
            length=t,
            cached=cache is not None,
        )
        if implementation == "xla":
            kv_slots = jnp.arange(valid_bs.shape[1])
            allowed_bts = (kv_slots[None, None, :] <= q_slots[None, :, None]) & valid_bs[:, None, :]
            if segment_ids is not None:
                allowed_bts &= segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = AttentionMask(allowed_bts=allowed_bts)
        else:
            seg_bt = mask_bt.astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            mask = AttentionMask(segment_ids_bt=seg_bt, implementation=implementation)
        if routing is None and self.moe is not None:
            routing = RoutingSettings(jnp.float32(self.moe.temperature), top_k=self.moe.top_k)

        cos_bth, sin_bth = rope_tables(self.config, positions)
        x_btd = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        x_btd = constrain(x_btd, ("batch", "length", "embed"))
        kv = None if cache is None else (cache.k, cache.v)
        layer_keys = (
            None if dropout_rng is None else jax.random.split(dropout_rng, self.config.num_hidden_layers)
        )
        labels_m = None if gate_labels is None else gate_labels.reshape(b * t).astype(jnp.int32)
        walk = _LayerWalk(
            routing, labels_m, self.gate_loss_grad, return_routing, REMAT_POLICIES[self.remat],
            self.remat != "none", self.routing_noise,
        )  # fmt: skip
        inputs = AttentionInputs(cos_bth, sin_bth, mask, write_index)
        x_btd, kv, routes, stats = self._run_layers(x_btd, inputs, kv, layer_keys, walk)
        x_btd = self.norm(x_btd)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=kv[0], v=kv[1], valid=valid_bs, index=write_index + t)
        if not head:
            return CausalLMOutput(
                logits=None, cache=new_cache, routing=routes, gate_stats=stats, hidden=x_btd
            )
        logits = constrain(jnp.dot(x_btd, self.head_kernel()), ("batch", "length", "vocab"))
        return CausalLMOutput(logits=logits, cache=new_cache, routing=routes, gate_stats=stats)

    def head_kernel(self) -> jax.Array:
        """The LM head as a (D, V) kernel in the compute dtype (the embedding's transpose when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.dtype).T
        return self.lm_head.kernel[...].astype(self.dtype)

    def _run_layers(self, x_btd, inputs: AttentionInputs, kv, layer_keys, walk: _LayerWalk):
        """Walks the stacked layers (scanned or unrolled). Per-layer outputs (routing, gate
        statistics) come back stacked; routing is then split into "layers.{i}.{projection}"."""
        graphdef, state = nnx.split(self.layers)

        def one_layer(x, layer_state, layer_kv, key):
            layer = nnx.merge(graphdef, layer_state)
            ctx = ForwardContext(
                settings=walk.routing,
                dropout_key=key,
                gate_labels_m=walk.labels_m,
                detach_gate_input=walk.gate_loss_grad == "gates",
                routing_noise=walk.routing_noise,
            )
            x, layer_kv = layer(x, ctx, inputs, layer_kv)
            routes = ctx.routes if walk.return_routing else None
            return x, layer_kv, (routes, ctx.gate_stats if walk.labels_m is not None else None)

        if walk.remat:
            one_layer = jax.checkpoint(one_layer, policy=walk.policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:

            def body(x, xs):
                x, layer_kv, per_layer = one_layer(x, *xs)
                return x, (layer_kv, per_layer)

            x_btd, (kv, (stacked_routes, stats)) = jax.lax.scan(body, x_btd, (state, kv, layer_keys))
            per_layer_routes = None
            if walk.return_routing:
                per_layer_routes = [
                    jax.tree.map(lambda a, i=i: a[i], stacked_routes)
                    for i in range(self.config.num_hidden_layers)
                ]
        else:
            new_kv, per_layer_routes, per_layer_stats = [], [], []
            for i in range(self.config.num_hidden_layers):
                layer_state = jax.tree.map(lambda a, i=i: a[i], state)
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                key = None if layer_keys is None else layer_keys[i]
                x_btd, layer_kv, (routes, layer_stats) = one_layer(x_btd, layer_state, layer_kv, key)
                new_kv.append(layer_kv)
                per_layer_routes.append(routes)
                per_layer_stats.append(layer_stats)
            kv = None if kv is None else tuple(jnp.stack(parts) for parts in zip(*new_kv, strict=True))
            stats = None
            if walk.labels_m is not None:
                stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer_stats)
        flat = None
        if walk.return_routing:
            flat = {
                f"layers.{i}.{name}": r
                for i, routes in enumerate(per_layer_routes)
                for name, r in routes.items()
            }
        return x_btd, kv, flat, stats


@dataclasses.dataclass(frozen=True)
class _LayerWalk:
    """What one forward pass asks of every decoder layer (fixed for the whole walk)."""

    routing: RoutingSettings | None
    labels_m: jax.Array | None  # (B*T,) gate labels, training only
    gate_loss_grad: str  # "gates" | "all"
    return_routing: bool
    policy: object  # a jax.checkpoint policy, or None
    remat: bool
    routing_noise: float  # Gumbel scale on the top-k choice when a key is given (training)
