"""Attention behind one function: XLA (jax.nn.dot_product_attention) against a plain statement of
the math, the splash kernel (Pallas interpret mode) against XLA inside the model, and how "auto"
chooses. cuDNN runs on a GPU only; what CPU can check of it is the choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax.config import LlamaConfig
from meteora_jax.modeling import attention
from meteora_jax.modeling.attention import (
    SPLASH_BLOCK,
    AttentionMask,
    attend,
    check_training_length,
    resolve_attention,
)
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.sharding import make_mesh


def plain_attention(q_btnh, k_bskh, v_bskh, allowed_bts):
    """softmax(q k^T / sqrt(H)) v, each query head reading its group's key head; a query with no
    allowed slot averages every slot (the finite mask value), as the model always did."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh) * h**-0.5
    scores = jnp.where(allowed_bts[:, None, None], scores, -0.7 * float(jnp.finfo(jnp.float32).max))
    out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, axis=-1), v_bskh)
    return out.reshape(b, t, n, h)


def test_xla_matches_the_plain_statement_with_gqa_and_a_fully_masked_row():
    rng = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 5, 9, 6, 2, 8
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                ((b, t, n, h), (b, s, k, h), (b, s, k, h)))  # fmt: skip
    allowed = jnp.asarray(rng.random((b, t, s)) < 0.6).at[1, 2].set(False)  # row (1, 2) sees nothing
    out = attend(q, kk, v, AttentionMask(allowed_bts=allowed))
    assert float(jnp.abs(out - plain_attention(q, kk, v, allowed)).max()) <= 1e-6


CONFIG = LlamaConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2 * SPLASH_BLOCK,
)  # fmt: skip


@pytest.fixture(scope="module")
def models():
    """The same random weights behind XLA and splash attention."""
    xla = LlamaForCausalLM(CONFIG, attention="xla", rngs=nnx.Rngs(0))
    splash = LlamaForCausalLM(CONFIG, attention="splash", rngs=nnx.Rngs(0))
    return xla, splash


def _inputs():
    rng = np.random.default_rng(1)
    t = SPLASH_BLOCK
    ids = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (2, t)), jnp.int32)
    segments = np.zeros((2, t), np.int32)
    segments[0, :50], segments[0, 50:110] = 1, 2  # two packed samples, then padding
    segments[1, 7:] = 1  # padding first, then one sample
    return ids, jnp.asarray(segments)


def _logits_and_grads(model, ids, segments):
    """Logits and the parameter gradient of sum(sin(logits)) over real tokens (segment > 0), jitted."""
    graphdef, params = nnx.split(model, nnx.Param)
    weight = jnp.asarray(segments > 0, jnp.float32)[..., None]

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=segments).logits
        return jnp.sum(jnp.sin(logits) * weight), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _assert_agree(logits_x, grads_x, logits_s, grads_s, real):
    assert float(np.abs(np.asarray(logits_x - logits_s)[real]).max()) <= 1e-5
    for g_x, g_s in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_s), strict=True):
        assert float(jnp.abs(g_x - g_s).max()) <= 1e-4 * (1 + float(jnp.abs(g_x).max()))


def test_splash_matches_xla_on_packed_rows_forward_and_gradient(models):
    """Packed samples and padding (segment ids): logits on every real token and the gradient of
    a loss over real tokens agree; padding positions are not compared (they read nothing real)."""
    ids, segments = _inputs()
    real = np.asarray(segments) > 0

    (logits_x, grads_x), (logits_s, grads_s) = (_logits_and_grads(m, ids, segments) for m in models)
    _assert_agree(logits_x, grads_x, logits_s, grads_s, real)


@pytest.mark.parametrize(
    ("sizes", "rows", "heads", "kv_heads"),
    [
        ((2, 2, 2), 1, 2, 1),  # batch 4 over data x fsdp; 4 query / 2 key heads over tensor
        ((2, 1, 4), 2, 4, 2),  # 2 key heads do not split 4 ways: every shard keeps all heads
    ],
)
def test_splash_under_a_mesh_runs_per_shard_and_matches_xla_on_one_device(
    models, monkeypatch, sizes, rows, heads, kv_heads
):
    """Under a mesh the kernel runs per device on its rows and heads, not on inputs gathered whole;
    logits and the gradient of a loss over real tokens equal one device's XLA attention."""
    ids, segments = _inputs()
    ids, segments = jnp.concatenate([ids, ids[::-1]]), jnp.concatenate([segments, segments[::-1]])
    real = np.asarray(segments) > 0
    seen = []

    def spy(q_btnh, k_btkh, v_btkh, segment_ids_bt):
        seen.append((q_btnh.shape, k_btkh.shape, segment_ids_bt.shape))
        return splash_kernel(q_btnh, k_btkh, v_btkh, segment_ids_bt)

    splash_kernel = attention._splash
    monkeypatch.setattr(attention, "_splash", spy)

    xla, splash = models
    logits_x, grads_x = _logits_and_grads(xla, ids, segments)
    with jax.set_mesh(make_mesh(*sizes)):
        logits_s, grads_s = _logits_and_grads(splash, ids, segments)
    t, h = SPLASH_BLOCK, CONFIG.head_dim
    assert seen and set(seen) == {((rows, t, heads, h), (rows, t, kv_heads, h), (rows, t))}
    _assert_agree(logits_x, grads_x, logits_s, grads_s, real)


def test_splash_matches_xla_on_a_left_padded_batch(models):
    """A left-padded batch (an attention mask, as generation gives): logits on the real tokens and
    the gradient of a loss over them agree."""
    ids, _ = _inputs()
    mask = np.ones(ids.shape, np.int32)
    mask[1, :20] = 0
    weight = jnp.asarray(mask, jnp.float32)[..., None]

    def logits_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, attention_mask=jnp.asarray(mask)).logits
            return jnp.sum(jnp.sin(logits) * weight), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    (logits_x, grads_x), (logits_s, grads_s) = (logits_and_grads(m) for m in models)
    _assert_agree(logits_x, grads_x, logits_s, grads_s, mask > 0)


@pytest.mark.parametrize(
    ("platform", "dtype", "length", "cached", "expected"),
    [
        ("cpu", jnp.bfloat16, 4096, False, "xla"),
        ("gpu", jnp.bfloat16, 4096, False, "cudnn"),
        ("gpu", jnp.float32, 4096, False, "xla"),  # cuDNN's flash attention is half precision only
        ("gpu", jnp.bfloat16, 1, True, "xla"),  # decode over a cache: the explicit mask
        ("tpu", jnp.float32, 4096, False, "splash"),
        ("tpu", jnp.float32, 100, False, "xla"),  # not a multiple of the splash block
    ],
)
def test_auto_by_platform(platform, dtype, length, cached, expected):
    got = resolve_attention(
        "auto", dtype=dtype, head_dim=128, length=length, cached=cached, platform=platform
    )
    assert got == expected


@pytest.mark.parametrize(
    ("implementation", "length", "cached"), [("cudnn", 1, True), ("splash", 1, True), ("splash", 100, False)]
)
def test_a_kernel_gives_way_to_xla_where_it_cannot_run(implementation, length, cached):
    got = resolve_attention(implementation, dtype=jnp.bfloat16, head_dim=16, length=length, cached=cached)
    assert got == "xla"


def test_an_unknown_implementation_is_refused_by_name():
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        resolve_attention("flash", dtype=jnp.float32, head_dim=16, length=128, cached=False)


def test_a_splash_model_runs_xla_off_its_block(models):
    ids = jnp.asarray(np.random.default_rng(3).integers(1, CONFIG.vocab_size, (1, 5)), jnp.int32)
    xla, splash = (m(ids).logits for m in models)
    assert float(jnp.abs(xla - splash).max()) == 0.0


def test_training_refuses_a_length_off_the_splash_block():
    check_training_length("splash", 256)
    check_training_length("xla", 100)
    with pytest.raises(ValueError, match="--attention splash needs --seq-len a multiple of 128, got 100"):
        check_training_length("splash", 100)


@pytest.mark.parametrize("t", [1024, 1100])  # whole blocks, and a partial last block
def test_xla_query_blocks_change_no_value_forward_or_gradient(t):
    """Past XLA_QUERY_BLOCK queries XLA attends block by block (memory); the values and the
    gradients equal one whole (T, S) softmax."""
    rng = np.random.default_rng(2)
    b, n, k, h = 1, 2, 1, 8
    q, kk, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                ((b, t, n, h), (b, t, k, h), (b, t, k, h)))  # fmt: skip
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & jnp.asarray(rng.random((b, 1, t)) < 0.9)
    cotangent = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

    def out_and_grads(fn):
        def loss(q, kk, v):
            out = fn(q, kk, v)
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True, argnums=(0, 1, 2)))(q, kk, v)
        return out, grads

    whole, grads_whole = out_and_grads(lambda *a: plain_attention(*a, allowed))
    blocked, grads_blocked = out_and_grads(lambda *a: attend(*a, AttentionMask(allowed_bts=allowed)))
    assert float(jnp.abs(whole - blocked).max()) <= 1e-5
    for g_w, g_b in zip(grads_whole, grads_blocked, strict=True):
        assert float(jnp.abs(g_w - g_b).max()) <= 1e-4
