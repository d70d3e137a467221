"""The chunked LM cross entropy: the same sums and gradients as the whole logits, in less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.training.losses import chunked_lm_sums, lm_sums

B, S, D, V = 2, 67, 16, 3001  # 67 slots: four chunks of 16 and a padded fifth


def _inputs():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (B, S)), jnp.float32)
    return hidden, kernel, targets, weights


def _plain(hidden, kernel, targets, weights):
    return lm_sums(hidden @ kernel, targets, weights)[0]


def _chunked(hidden, kernel, targets, weights, chunk=16):
    return chunked_lm_sums(hidden, kernel, targets, weights, chunk)[0]


def test_sums_and_gradients_equal_the_whole_logits():
    hidden, kernel, targets, weights = _inputs()
    for chunk in (16, 67, 1000):  # several chunks, exactly one, one larger than the row
        got = chunked_lm_sums(hidden, kernel, targets, weights, chunk)
        want = lm_sums(hidden @ kernel, targets, weights)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    got = jax.grad(_chunked, argnums=(0, 1))(hidden, kernel, targets, weights)
    want = jax.grad(_plain, argnums=(0, 1))(hidden, kernel, targets, weights)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_the_gradient_never_holds_the_whole_logits():
    """The compiled gradient's temporaries hold at most three chunks' float32 logits (a chunk's
    logits, their softmax and its gradient), under one copy of the whole (B, S, V) logits, where
    the plain loss needs several copies."""
    args = _inputs()
    logits_bytes, chunk_bytes = B * S * V * 4, B * 16 * V * 4

    def temporaries(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(_plain) >= 2 * logits_bytes
    assert temporaries(_chunked) <= 3 * chunk_bytes < logits_bytes
