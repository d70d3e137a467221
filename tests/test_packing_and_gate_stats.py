"""The model side of training: packed rows (segment ids), gate statistics inside the layer walk, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs
from flax import nnx

import meteora_jax as mj
from meteora_jax.config import PROJECTIONS, MoELoRAConfig
from meteora_jax.modeling.llama import LlamaForCausalLM, segment_positions
from meteora_jax.modeling.meteora_linear import GateParam, gate_stats
from meteora_jax.ops.routing import RoutingSettings

CONFIG = mj.LlamaConfig(
    vocab_size=101,
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
)
MOE = MoELoRAConfig(("a", "b", "c", "d"), PROJECTIONS, 4, top_k=2)


def _module(scan_layers: bool = True, moe: MoELoRAConfig = MOE) -> LlamaForCausalLM:
    module = LlamaForCausalLM(CONFIG, moe, scan_layers=scan_layers, rngs=nnx.Rngs(0))
    lora = nnx.state(module, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(lora))))
    nnx.update(module, jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape), lora))
    return module


@pytest.fixture(scope="module")
def module():
    return _module()


def test_segment_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]


def test_packed_row_equals_each_sample_alone(module):
    """Packed samples never attend to each other and their positions restart: the logits and
    routing of each sample inside a packed row equal those of the sample run alone."""
    rng = np.random.default_rng(0)
    lengths = (7, 12, 5)
    samples = [rng.integers(0, CONFIG.vocab_size, n) for n in lengths]
    width = sum(lengths) + 4  # 4 padding slots at the end
    ids = np.zeros((1, width), np.int32)
    seg = np.zeros((1, width), np.int32)
    start = 0
    for i, sample in enumerate(samples):
        ids[0, start : start + len(sample)] = sample
        seg[0, start : start + len(sample)] = i + 1
        start += len(sample)
    packed = module(jnp.asarray(ids), segment_ids=jnp.asarray(seg), return_routing=True)
    start = 0
    worst = 0.0
    for sample in samples:
        alone = module(jnp.asarray(sample[None]), return_routing=True)
        sl = slice(start, start + len(sample))
        worst = max(worst, max_abs(packed.logits[0, sl], alone.logits[0]))
        for key in ("layers.0.q_proj", "layers.2.down_proj"):
            np.testing.assert_array_equal(packed.routing[key].ids[0, sl], alone.routing[key].ids[0])
        start += len(sample)
    assert worst <= 1e-5, worst


def test_gate_stats_against_a_plain_statement():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 4)).astype(np.float32)
    labels = np.array([0, 3, -1, 2, 2, 1, -1, 0, 3])
    stats = gate_stats(jnp.asarray(logits), jnp.asarray(labels))
    keep = labels >= 0
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse[keep] - logits[keep, labels[keep]]
    np.testing.assert_allclose(float(stats.ce_sum), ce.sum(), rtol=1e-6)
    assert float(stats.correct) == (logits.argmax(-1)[keep] == labels[keep]).sum()
    assert float(stats.count) == keep.sum()


def test_gate_stats_of_the_model_equal_the_returned_gate_logits(module):
    """The per-layer statistics computed inside the scan equal those of the full gate logits
    returned for inspection, and the routing output is unchanged by asking for them."""
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 11)), jnp.int32)
    labels = jnp.asarray(rng.integers(-1, 4, (2, 11)), jnp.int32)
    settings = RoutingSettings(jnp.float32(1.0), top_k=2, return_logits=True)
    full = module(ids, routing=settings, return_routing=True)
    with_stats = module(ids, gate_labels=labels, return_routing=True)
    assert set(with_stats.gate_stats) == set(PROJECTIONS)
    for proj in PROJECTIONS:
        for layer in range(CONFIG.num_hidden_layers):
            z = full.routing[f"layers.{layer}.{proj}"].logits.reshape(-1, 4)
            want = gate_stats(z, labels.reshape(-1))
            got = jax.tree.map(lambda a, layer=layer: a[layer], with_stats.gate_stats[proj])
            np.testing.assert_allclose(float(got.ce_sum), float(want.ce_sum), rtol=1e-5)
            assert float(got.correct) == float(want.correct) and float(got.count) == float(want.count)
    assert with_stats.routing["layers.1.v_proj"].logits is None
    np.testing.assert_array_equal(with_stats.logits, full.logits)


def test_remat_and_unrolled_layers_give_the_same_gradients():
    """Rematerialisation changes what the backward pass keeps, never the numbers; the unrolled
    walk gives the same gate statistics and gradients as the scanned one. (Two targeted
    projections keep the compile short.)"""
    moe = MoELoRAConfig(("a", "b", "c", "d"), ("q_proj", "down_proj"), 4, top_k=2)
    module = _module(moe=moe)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 9)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 9)), jnp.int32)

    def loss(m):
        out = m(ids, gate_labels=labels)
        ce = sum(jnp.sum(s.ce_sum) for s in out.gate_stats.values())
        return ce + jnp.mean(out.logits**2)

    @nnx.jit  # compiled: op-by-op the unrolled backward dominated the test
    def gate_grads(m):
        return nnx.grad(loss, argnums=nnx.DiffState(0, GateParam))(m)

    def remat_grads(m, remat):
        m.configure_training(remat=remat)
        return gate_grads(m)

    base = jax.tree.leaves(remat_grads(module, "none"))
    others = [remat_grads(module, remat) for remat in ("dots", "full")]
    others.append(remat_grads(_module(False, moe), "none"))
    for got in others:
        assert max(max_abs(a, b) for a, b in zip(jax.tree.leaves(got), base, strict=True)) <= 1e-5
    with pytest.raises(ValueError, match=r"remat='some' is not one of \('none', 'dots', 'full'\)"):
        module.configure_training(remat="some")
    with pytest.raises(ValueError, match=r"gate_loss_grad='input' is not one of \('gates', 'all'\)"):
        module.configure_training(gate_loss_grad="input")
