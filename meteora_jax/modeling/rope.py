"""Rotary position embeddings, with LLaMA's linear, dynamic-NTK and llama3 scalings.

Dimensions: B batch, T tokens, N heads, H head dim.

Inverse frequencies are computed in float32 exactly as transformers does, because at a few
thousand positions a one-ulp difference in a frequency already moves logits by ~1e-4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.config import LlamaConfig


def _default_inv_freq(theta, head_dim: int, xp=np):
    exponents = xp.arange(0, head_dim, 2).astype(xp.float32) / xp.float32(head_dim)
    return (1.0 / (xp.asarray(theta, dtype=xp.float32) ** exponents)).astype(xp.float32)


def static_inv_freq(config: LlamaConfig) -> np.ndarray:
    """(H/2,) float32 inverse frequencies for every rope type but dynamic beyond its window."""
    inv_freq = _default_inv_freq(config.rope_theta, config.head_dim)
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq_for(config: LlamaConfig, positions_bt: jax.Array) -> jax.Array:
    """(H/2,) inverse frequencies for this call.

    Dynamic NTK scaling depends on the longest sequence seen (max position + 1, over the
    batch), like transformers: below `max_position_embeddings` it is the plain rope.
    """
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type != "dynamic":
        return jnp.asarray(static_inv_freq(config))
    max_len = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions_bt) + 1, max_len).astype(jnp.float32)
    dim = config.head_dim
    base = config.rope_theta * ((scaling.factor * seq_len / max_len) - (scaling.factor - 1)) ** (
        dim / (dim - 2)
    )
    return _default_inv_freq(base, dim, xp=jnp)


def rope_tables(config: LlamaConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables (B, T, H) in float32 for integer positions (B, T)."""
    inv_freq = inv_freq_for(config, positions_bt)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotates query/key heads; the half-split layout matches HF LLaMA's (permuted) weights."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
    sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin
