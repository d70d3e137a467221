"""One input check and one routing resolution for every entry point; the model call's host work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meteora_jax as mj
from meteora_jax.api import MeteoRAModel
from meteora_jax.config import PROJECTIONS, MoELoRAConfig
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.inputs import check_tokens, is_int, is_real, resolve_routing
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.modeling.meteora_linear import GateParam

CONFIG = mj.LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
MOE = MoELoRAConfig(("a", "b", "c"), PROJECTIONS, 4, top_k=2)


@pytest.fixture(scope="module")
def model():
    module = LlamaForCausalLM(CONFIG, MOE, rngs=nnx.Rngs(0))
    # Non-zero B so the adapters (and so the gates) change the output.
    state = nnx.state(module, nnx.LoRAParam)
    nnx.update(module, jax.tree.map(lambda a: 0.1 * jax.random.normal(jax.random.key(1), a.shape), state))
    return MeteoRAModel(module)


def test_number_predicates():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_real(2.5) and is_real(np.float32(1)) and is_real(3) and not is_real(False) and not is_real("1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=np.zeros((1, 0), np.int32)), r"input_ids must be a non-empty integer array"),
        (dict(input_ids=np.zeros((0, 3), np.int32)), r"input_ids must be a non-empty integer array"),
        (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[0, 0]])), r"row 0 has no real token"),
        (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[1, 2]])), r"only 0 \(padding\) and 1"),
        (dict(input_ids=np.array([[1, 2]]), attention_mask=np.array([[1.0, 1.0]])), r"must hold integers"),
        (dict(input_ids=np.array([[1, 2]]), positions=np.array([[0.5, 1]])), r"positions must hold integers"),
    ],
)
def test_model_call_refuses_bad_tokens(model, kwargs, match):
    with pytest.raises(MeteoRAError, match=match):
        model(**kwargs)


def test_left_padding_is_required_only_where_asked():
    ids, mask = np.array([[5, 6, 7]]), np.array([[1, 1, 0]])
    assert check_tokens(ids, 97, mask).attention_mask.tolist() == [[1, 1, 0]]
    with pytest.raises(MeteoRAError, match="pad on the left .* row 0 has a 0 after a 1"):
        check_tokens(ids, 97, mask, left_padded=True)


@pytest.mark.parametrize(
    ("batch", "length", "named"), [(-1, 8, "batch"), (2, -5, "max_length"), (1.5, 4, "batch")]
)
def test_init_cache_refuses_bad_sizes(model, batch, length, named):
    with pytest.raises(MeteoRAError, match=f"init_cache: {named} must be a positive integer"):
        model.init_cache(batch, length)


def test_resolve_routing_names_the_setting_as_the_caller_does():
    with pytest.raises(
        ConfigError, match=r"routing_top_k must be an integer in \[1, 3\] \(the number of adapters\)"
    ):
        resolve_routing(MOE, 1, top_k=4, prefix="routing_")
    with pytest.raises(ConfigError, match=r"^top_k must be an integer in \[1, 3\]"):
        resolve_routing(MOE, 1, top_k=0)
    with pytest.raises(ConfigError, match="routing_temperature must be a number > 0, got inf"):
        resolve_routing(MOE, 1, temperature=float("inf"), prefix="routing_")
    with pytest.raises(MeteoRAError, match=r"adapter_ids must lie in \[-1, 3\)"):
        resolve_routing(MOE, 2, adapter_ids=[0, 3])
    with pytest.raises(MeteoRAError, match="^routing_top_k, adapter_ids: this model has no adapters"):
        resolve_routing(None, 1, top_k=1, adapter_ids=[0], prefix="routing_")
    settings = resolve_routing(MOE, 2, temperature=3.0, adapter_ids=[1, -1], return_logits=True)
    assert settings.top_k == 2 and float(settings.temperature) == 3.0 and settings.return_logits
    assert settings.forced_ids.tolist() == [1, -1]
    assert resolve_routing(None, 1) is None


def test_decode_loop_on_device_arrays_copies_nothing_to_the_host(model):
    """A decode loop fed by the model's own outputs: no device-to-host transfer per call (the
    cache's length is known on the host, and device-resident ids get shape checks only)."""
    cache = model.init_cache(2, 12)
    out = model(np.array([[3, 4, 5], [6, 7, 8]]), cache=cache)
    with jax.transfer_guard_device_to_host("disallow"):
        for _ in range(4):
            tok = jnp.argmax(out.logits[:, -1:], axis=-1).astype(jnp.int32)
            out = model(tok, cache=out.cache)
    # The room check still holds for device-resident inputs: 7 of 12 slots are used.
    with pytest.raises(MeteoRAError, match=r"cache has room for 5 more tokens, got 6"):
        model(jnp.ones((2, 6), jnp.int32), cache=out.cache)


def test_cached_forward_sees_in_place_updates(model):
    """The model call caches its graph walk, yet a training-style in-place update of the gates
    (or any variable) shows in the next call, equal to a freshly built model with those values."""
    ids = np.array([[3, 14, 15, 92, 65, 35]])
    before = np.asarray(model(ids).logits)
    gates = jax.tree.map(np.array, nnx.state(model.module, GateParam))  # a copy, not the variables
    nnx.update(model.module, jax.tree.map(lambda g: -g, gates))
    after = np.asarray(model(ids).logits)
    fresh = MeteoRAModel(nnx.merge(*nnx.split(model.module)))
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, np.asarray(fresh(ids).logits))
    nnx.update(model.module, gates)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), before)
