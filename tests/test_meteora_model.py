"""The fused MeteoRA model end to end against PEFT and a torch statement of docs/method.md.

One tiny GQA base, six PEFT adapters that between them use every adapter feature we read
(plain, rsLoRA, rank/alpha patterns, regex targets, layer subsets, all-linear, mixed ranks),
and the model's random gates (read back out of it).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    TorchMeteoRA,
    make_hf_model,
    make_peft_adapter,
    max_abs,
    padded_positions,
    peft_experts,
    torch_logits,
    torch_meteora_model,
)
from flax import nnx

import meteora_jax as mj
from meteora_jax.config import PROJECTIONS, MoELoRAConfig
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.inputs import check_tokens, resolve_routing
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.ops import BACKENDS

TOL = 1e-4
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "up_proj", "down_proj"],
        rank_pattern={"up_proj": 6},
        alpha_pattern={"down_proj": 12},
    ),
    "regex": dict(r=2, lora_alpha=5, target_modules=r".*\.layers\.[02]\.mlp\.(gate|up)_proj"),
    "layers": dict(
        r=3, lora_alpha=6, target_modules=["v_proj", "gate_proj", "down_proj"], layers_to_transform=[1]
    ),
    "alllinear": dict(r=5, lora_alpha=10, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("meteora")
    _, base_dir = make_hf_model(root / "base", num_hidden_layers=3)
    dirs = {
        name: make_peft_adapter(base_dir, root / name, seed=i + 1, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    return base_dir, dirs


@pytest.fixture(scope="module")
def fused(setup):
    base_dir, dirs = setup
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(base_dir, adapters=dirs, top_k=2)
    return model


@pytest.fixture(scope="module")
def torch_fused(setup, fused):
    base_dir, dirs = setup
    return torch_meteora_model(base_dir, list(dirs.values()), gates_of(fused), top_k=2, temperature=1.0)


def gates_of(model) -> dict:
    """(layer, projection) -> gate (in, L) read out of a fused meteora_jax model."""
    gates = {}
    for proj in model.moe.targets:
        block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
        stacked = np.asarray(getattr(getattr(model.module.layers, block), proj).gate[...])
        gates.update({(layer, proj): stacked[layer] for layer in range(stacked.shape[0])})
    return gates


def ids_of(seed, batch, length, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_single_adapter_top1_equals_peft(setup, name, record_error):
    import peft
    import transformers

    base_dir, dirs = setup
    model = mj.load_model(base_dir, adapters={name: dirs[name]}, gates=None, top_k=1)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, dirs[name]).eval()
    ids = ids_of(1, 2, 37)
    want = torch_logits(reference, ids)
    got = np.asarray(model(ids).logits)
    err = max_abs(got, want)
    record_error(f"{name} alone, top-1 vs PEFT", err)
    assert err <= TOL
    with reference.disable_adapter():
        assert max_abs(torch_logits(reference, ids), want) > 100 * TOL, "the adapter must change the output"


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mixture_equals_torch_statement(fused, torch_fused, top_k, temperature, record_error):
    for module in torch_fused.modules():
        if isinstance(module, TorchMeteoRA):
            module.top_k, module.temperature = top_k, temperature
    ids = ids_of(top_k, 2, 45)
    err = max_abs(fused(ids, top_k=top_k, temperature=temperature).logits, torch_logits(torch_fused, ids))
    record_error(f"6 adapters, k={top_k}, T={temperature} vs torch statement", err)
    assert err <= TOL


def test_mixture_long_prompt_equals_torch_statement(fused, torch_fused, record_error):
    for module in torch_fused.modules():
        if isinstance(module, TorchMeteoRA):
            module.top_k, module.temperature = 2, 1.0
    ids = ids_of(9, 1, 500)
    err = max_abs(fused(ids).logits, torch_logits(torch_fused, ids))
    record_error("6 adapters, k=2, 500 tokens vs torch statement", err)
    assert err <= TOL


def test_routing_output(fused):
    ids = ids_of(2, 2, 11)
    out = fused(ids, return_routing=True, return_gate_logits=True, top_k=3)
    layers = fused.config.num_hidden_layers
    assert fused.moe.targets == PROJECTIONS  # all-linear covers every projection
    assert set(out.routing) == {f"layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS}
    n = len(fused.adapter_names)
    for key, r in out.routing.items():
        assert r.ids.shape == (2, 11, 3) and r.ids.dtype == jnp.int32, key
        assert r.logits.shape == (2, 11, n)
        np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 1.0, atol=1e-6)
        expected = np.argsort(-np.asarray(r.logits), axis=-1, kind="stable")[..., :3]
        np.testing.assert_array_equal(np.sort(np.asarray(r.ids), -1), np.sort(expected, -1))
        assert np.all(np.diff(np.asarray(r.weights), axis=-1) <= 1e-7), "weights follow the logit order"
    plain = fused(ids, return_routing=True)
    assert plain.routing["layers.0.q_proj"].logits is None
    assert fused(ids).routing is None
    assert fused.adapter_names == tuple(ADAPTERS)


def test_temperature_is_a_runtime_setting_that_never_recompiles(fused):
    ids = ids_of(3, 1, 8)
    fused(ids, temperature=1.0)
    program = fused.forward_program().jitted_fn
    before = program._cache_size()
    low = fused(ids, temperature=0.5, return_routing=True).routing["layers.1.up_proj"].weights
    high = fused(ids, temperature=50.0, return_routing=True).routing["layers.1.up_proj"].weights
    fused(ids, temperature=7.0)
    assert program._cache_size() <= before + 1  # only return_routing=True adds a program
    assert float(jnp.max(high)) < float(jnp.max(low)), "a higher temperature flattens the weights"


def test_the_public_call_returns_no_parameter_copies(fused):
    """The program behind `model(ids)` outputs the logits alone, as a plain jit of the module
    does; a forward jitted with `graph_updates=True` (the positive control) returns every
    parameter too, a copy per call."""
    ids = ids_of(4, 2, 9)
    tokens = check_tokens(ids, fused.config.vocab_size)
    routing = resolve_routing(fused.moe, 2)
    args = (tokens.input_ids, tokens.attention_mask, tokens.positions, None, routing)
    logits_bytes = 2 * 9 * fused.config.vocab_size * 4
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(fused.module, nnx.Param)))

    def out_bytes(lowered) -> int:
        lowered = getattr(lowered, "lowered", lowered)  # nnx.jit's stage wraps jax's
        return sum(math.prod(o.shape) * o.dtype.itemsize for o in jax.tree.leaves(lowered.out_info))

    program = fused.forward_program()
    public = program.jitted_fn.lower(program.partial_args, *args, return_routing=False)
    graphdef, state = nnx.split(fused.module)
    plain = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a[:3], cache=a[3], routing=a[4]).logits)
    assert out_bytes(public) == out_bytes(plain.lower(state, *args)) == logits_bytes
    updating = nnx.jit(
        lambda m, *a: m(*a[:3], cache=a[3], routing=a[4]).logits, graph=True, graph_updates=True
    )
    assert out_bytes(updating.lower(fused.module, *args)) >= logits_bytes + param_bytes


def test_left_padded_rows_and_kv_cache(fused):
    ids = ids_of(4, 2, 16)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    full = np.asarray(fused(ids, attention_mask=mask).logits)
    alone = np.asarray(fused(ids[:1, 5:]).logits)
    assert max_abs(full[0, 5:], alone[0]) <= 1e-5

    cache = fused.init_cache(batch=2, max_length=20)
    step = fused(ids[:, :10], attention_mask=mask[:, :10], cache=cache)
    parts = [np.asarray(step.logits)]
    for t in range(10, 16):
        step = fused(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=step.cache)
        parts.append(np.asarray(step.logits))
    cached = np.concatenate(parts, axis=1)
    assert max_abs(cached[0, 5:], full[0, 5:]) <= 1e-5 and max_abs(cached[1], full[1]) <= 1e-5
    assert padded_positions(mask)[0, 5] == 0


def test_scan_and_unrolled_layers_agree(setup, fused):
    base_dir, dirs = setup
    with pytest.warns(UserWarning):
        unrolled = mj.load_model(base_dir, adapters=dirs, top_k=2, scan_layers=False)
    ids = ids_of(5, 2, 9)
    a, b = fused(ids, return_routing=True), unrolled(ids, return_routing=True)
    assert max_abs(a.logits, b.logits) <= 1e-5
    np.testing.assert_array_equal(a.routing["layers.2.o_proj"].ids, b.routing["layers.2.o_proj"].ids)


def test_gates_are_seeded(setup, fused):
    base_dir, dirs = setup
    with pytest.warns(UserWarning, match="seed 7"):
        other = mj.load_model(base_dir, adapters=dirs, seed=7)
    ours, theirs = gates_of(fused), gates_of(other)
    assert not np.allclose(ours[(0, "q_proj")], theirs[(0, "q_proj")])
    with pytest.warns(UserWarning):
        again = mj.load_model(base_dir, adapters=dirs)
    np.testing.assert_array_equal(gates_of(again)[(1, "down_proj")], ours[(1, "down_proj")])


def test_zero_experts_and_padded_ranks(setup, fused):
    """An adapter absent from a module has zero A, B and scale there; smaller ranks are zero-padded."""
    base_dir, dirs = setup
    mlp = fused.module.layers.mlp
    names = fused.adapter_names
    regex, layers = names.index("regex"), names.index("layers")
    assert fused.moe.rank == 8
    scale = np.asarray(mlp.gate_proj.scale[...])  # (Y, L)
    assert scale[1, regex] == 0 and scale[0, regex] == pytest.approx(5 / 2)
    assert scale[0, layers] == 0 and scale[1, layers] == pytest.approx(6 / 3)
    a = np.asarray(mlp.gate_proj.lora_a[...])  # (Y, L, in, R)
    assert np.all(a[1, regex] == 0) and np.all(a[0, regex, :, 2:] == 0) and np.any(a[0, regex, :, :2] != 0)
    experts = peft_experts(base_dir, dirs["patterns"])
    up = np.asarray(mlp.up_proj.lora_a[...])[2, names.index("patterns"), :, :6]
    np.testing.assert_allclose(up, experts[(2, "up_proj")][0].numpy().T, atol=0)
    assert np.asarray(mlp.down_proj.scale[...])[0, names.index("patterns")] == pytest.approx(12 / 4)


def _tiny_trained(moe: MoELoRAConfig):
    """A 2-layer MeteoRA model over `moe` with random LoRA B stacks (so every adapter changes the
    output), and its jitted calls with a training key and without one, on a (2, 16) batch."""
    config = mj.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    model = LlamaForCausalLM(config, moe, rngs=nnx.Rngs(0))
    for name in moe.targets:
        block = model.layers.mlp if name in ("gate_proj", "up_proj", "down_proj") else model.layers.self_attn
        proj = getattr(block, name)
        proj.lora_b[...] = jax.random.normal(jax.random.key(1), proj.lora_b[...].shape)
    ids = jnp.asarray(ids_of(0, 2, 16, vocab=50))
    run = nnx.jit(lambda m, key: m(ids, dropout_rng=key).logits)
    evaluate = nnx.jit(lambda m: m(ids).logits)
    return model, run, evaluate


def test_lora_dropout_applies_only_in_training():
    moe = MoELoRAConfig(adapter_names=("a", "b"), targets=("q_proj", "up_proj"), rank=4, top_k=1, dropout=0.5)
    model, run, evaluate = _tiny_trained(moe)
    eval_a, eval_b = evaluate(model), evaluate(model)
    train_a, train_b = run(model, jax.random.key(0)), run(model, jax.random.key(1))
    assert max_abs(eval_a, eval_b) == 0
    assert max_abs(train_a, eval_a) > 1e-3 and max_abs(train_a, train_b) > 1e-3
    no_dropout, run, evaluate = _tiny_trained(MoELoRAConfig(("a", "b"), ("q_proj",), 4, top_k=1))
    assert max_abs(run(no_dropout, jax.random.key(0)), evaluate(no_dropout)) == 0


def test_routing_noise_applies_only_in_training():
    """configure_training(routing_noise=...) changes the calls given a training key (their top-k
    is drawn), never those without one; a bad scale is refused by name."""
    moe = MoELoRAConfig(adapter_names=("a", "b", "c"), targets=("v_proj", "up_proj"), rank=4, top_k=1)
    model, run, evaluate = _tiny_trained(moe)
    plain_eval, plain_train = evaluate(model), run(model, jax.random.key(0))
    assert max_abs(plain_eval, plain_train) == 0  # no dropout, no noise: the key changes nothing
    model.configure_training(routing_noise=1.0)
    assert max_abs(evaluate(model), plain_eval) == 0
    assert max_abs(run(model, jax.random.key(0)), plain_train) > 1e-3
    with pytest.raises(ValueError, match="routing_noise=-1.0 is not a finite number >= 0"):
        model.configure_training(routing_noise=-1.0)


def test_routing_settings_are_checked(setup, fused):
    base_dir, dirs = setup
    with pytest.raises(
        ConfigError, match=r"top_k must be an integer in \[1, 2\] \(the number of adapters\), got 3"
    ):
        mj.load_model(base_dir, adapters={k: dirs[k] for k in ("plain", "regex")}, top_k=3)
    with pytest.raises(ConfigError, match=r"top_k must be an integer in \[1, 6\]"):
        fused(ids_of(0, 1, 3), top_k=7)
    with pytest.raises(ConfigError, match="temperature"):
        fused(ids_of(0, 1, 3), temperature=0.0)
    base = mj.load_model(base_dir)
    with pytest.raises(MeteoRAError, match="no adapters"):
        base(ids_of(0, 1, 3), return_routing=True)
    assert base.adapter_names == ()


def test_forced_adapter_ids_equal_the_single_adapter_model(setup, fused):
    base_dir, dirs = setup
    ids = ids_of(6, 3, 12)
    names = fused.adapter_names
    forced = fused(ids, adapter_ids=[names.index("rslora"), -1, names.index("regex")], return_routing=True)
    alone = {
        n: mj.load_model(base_dir, adapters={n: dirs[n]}, gates=None, top_k=1) for n in ("rslora", "regex")
    }
    assert max_abs(forced.logits[0], alone["rslora"](ids[:1]).logits[0]) <= TOL
    assert max_abs(forced.logits[2], alone["regex"](ids[2:]).logits[0]) <= TOL
    assert max_abs(forced.logits[1], mj.load_model(base_dir)(ids[1:2]).logits[0]) <= TOL
    r = forced.routing["layers.0.q_proj"]
    assert (
        r.ids.shape == (3, 12, 1)
        and np.all(np.asarray(r.weights)[1] == 0)
        and np.all(np.asarray(r.weights)[0] == 1)
    )
    with pytest.raises(MeteoRAError, match=r"adapter_ids must lie in \[-1, 6\)"):
        fused(ids, adapter_ids=[0, 6, 1])
    with pytest.raises(MeteoRAError, match="one per row"):
        fused(ids, adapter_ids=[0, 1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("auto", "xla")])
def test_every_backend_gives_the_same_model(setup, fused, backend):
    base_dir, dirs = setup
    with pytest.warns(UserWarning):
        other = mj.load_model(base_dir, adapters=dirs, top_k=2, backend=backend)
    ids = ids_of(8, 2, 21)
    assert max_abs(other(ids).logits, fused(ids).logits) <= 1e-5
    assert max_abs(other(ids[:, :1]).logits, fused(ids[:, :1]).logits) <= 1e-5
