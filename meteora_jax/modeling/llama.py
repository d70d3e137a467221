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

from meteora_jax.config import LlamaConfig
from meteora_jax.modeling.rope import apply_rope, rope_tables
from meteora_jax.sharding import constrain

# Mask value for disallowed attention: finite, so fully-masked (padding) rows give no NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype, std: float = 0.02):
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


class Attention(nnx.Module):
    """Grouped-query attention over `S` key/value slots with an explicit (B, T, S) mask."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, k * h, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, k * h, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(n * h, d, ("heads", "embed"), **kw)
        self.shape_nkh = (n, k, h)
        self.dtype = dtype

    def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, kv_cache=None, write_index=None):
        """Returns (out (B, T, D), updated (k, v) cache or None).

        kv_cache: optional (k (B, S, K, H), v (B, S, K, H)); the new keys/values are written at
        slot `write_index` and attention runs over all S slots under `allowed_bts`.
        """
        b, t, _ = x_btd.shape
        n, k, h = self.shape_nkh
        q_btnh = apply_rope(self.q_proj(x_btd).reshape(b, t, n, h), cos_bth, sin_bth)
        k_btkh = apply_rope(self.k_proj(x_btd).reshape(b, t, k, h), cos_bth, sin_bth)
        v_btkh = self.v_proj(x_btd).reshape(b, t, k, h)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_bskh = jax.lax.dynamic_update_slice(
                k_cache, k_btkh.astype(k_cache.dtype), (0, write_index, 0, 0)
            )
            v_bskh = jax.lax.dynamic_update_slice(
                v_cache, v_btkh.astype(v_cache.dtype), (0, write_index, 0, 0)
            )
            kv_cache = (k_bskh, v_bskh)
        else:
            k_bskh, v_bskh = k_btkh, v_btkh
        q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh.astype(self.dtype)) * (h**-0.5)
        scores = jnp.where(allowed_bts[:, None, None], scores.astype(jnp.float32), _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh.astype(self.dtype))
        return self.o_proj(out_btkgh.reshape(b, t, n * h)), kv_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nnx.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, kv_cache=None, write_index=None):
        attn, kv_cache = self.self_attn(
            self.input_layernorm(x_btd), cos_bth, sin_bth, allowed_bts, kv_cache, write_index
        )
        x_btd = constrain(x_btd + attn, ("batch", "length", "embed"))
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
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
    """Model output. logits: (B, T, V) in the compute dtype; cache: the updated KVCache or None."""

    logits: jax.Array
    cache: KVCache | None = None


class LlamaForCausalLM(nnx.Module):
    """LLaMA decoder-only LM. `scan_layers` only changes how the forward pass walks the stack."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.scan_layers = scan_layers
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (v, d), param_dtype), logical_axes=("vocab", "embed")
        )

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(
            in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"}
        )
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(d, v, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """Forward pass over input_ids (B, T).

        attention_mask: (B, T), 1 for real tokens, 0 for (left) padding. positions: (B, T);
        by default each row counts its real tokens (so a left-padded row equals its unpadded
        self). cache: a KVCache to extend; the new tokens go at slots [index, index + T).
        """
        b, t = input_ids.shape
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
        kv_slots = jnp.arange(valid_bs.shape[1])
        allowed_bts = (kv_slots[None, None, :] <= q_slots[None, :, None]) & valid_bs[:, None, :]

        cos_bth, sin_bth = rope_tables(self.config, positions)
        x_btd = constrain(
            jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype),
            ("batch", "length", "embed"),
        )
        kv = None if cache is None else (cache.k, cache.v)
        x_btd, kv = self._run_layers(x_btd, cos_bth, sin_bth, allowed_bts, kv, write_index)
        x_btd = self.norm(x_btd)
        if self.lm_head is None:
            logits = jnp.dot(x_btd, self.embed_tokens[...].astype(self.dtype).T)
        else:
            logits = self.lm_head(x_btd)
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=kv[0], v=kv[1], valid=valid_bs, index=write_index + t)
        return CausalLMOutput(logits=logits, cache=new_cache)

    def _run_layers(self, x_btd, cos_bth, sin_bth, allowed_bts, kv, write_index):
        graphdef, state = nnx.split(self.layers)

        def one_layer(x, layer_state, layer_kv):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos_bth, sin_bth, allowed_bts, layer_kv, write_index)

        if self.scan_layers:

            def body(x, xs):
                return one_layer(x, *xs)

            return jax.lax.scan(body, x_btd, (state, kv))
        new_k, new_v = [], []
        for i in range(self.config.num_hidden_layers):
            layer_state = jax.tree.map(lambda a, i=i: a[i], state)
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x_btd, layer_kv = one_layer(x_btd, layer_state, layer_kv)
            if kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        return x_btd, (None if kv is None else (jnp.stack(new_k), jnp.stack(new_v)))
