"""Finite numbers everywhere: base weights, adapter scales, config floats and routing weights.

Each bad value is refused at load with a one-line error naming the tensor, key or file; and
routing stays finite (weights summing to 1) for any temperature > 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
from conftest import make_hf_model, make_peft_adapter

import meteora_jax as mj
from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.io.hf import load_llama
from meteora_jax.io.peft import LoRAModule, read_adapter
from meteora_jax.io.stacking import init_gates, param_path
from meteora_jax.ops.routing import RoutingSettings, route, tempered_softmax

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    _, base = make_hf_model(root / "base")
    adapter = make_peft_adapter(base, root / "adapter", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    return dict(base=base, adapter=adapter)


@pytest.fixture
def base(world, tmp_path):
    return os.fspath(shutil.copytree(world["base"], tmp_path / "base"))


def edit_weights(folder, edit) -> None:
    path = os.path.join(folder, WEIGHTS)
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path, **changes) -> str:
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)
    return os.fspath(path)


def one_line(error) -> str:
    assert "\n" not in str(error), str(error)
    return str(error)


# ----------------------------------------------------------------------------- base weights


def test_nan_and_inf_base_weights_are_refused_naming_the_tensor(base):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        t["model.norm.weight"][0] = float("inf")

    edit_weights(base, poison)
    with pytest.raises(CheckpointError) as info:
        mj.load_model(base)
    assert one_line(info.value) == (
        f"{base}: NaN or Inf weights: tensor model.layers.1.mlp.up_proj.weight (as float32); "
        "tensor model.norm.weight (as float32)"
    )


def test_weights_that_overflow_the_parameter_dtype_are_refused(base):
    edit_weights(base, lambda t: t["model.layers.0.self_attn.o_proj.weight"].__setitem__((0, 0), 1e6))
    mj.load_model(base)  # fine in float32
    with pytest.raises(
        CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\.weight \(as float16\)"
    ):
        mj.load_model(base, dtype="float16")


def test_non_finite_gates_are_refused_naming_the_parameter(world):
    config = LlamaConfig.from_hf(world["base"])
    moe = MoELoRAConfig(adapter_names=("a",), targets=("q_proj",), rank=2, top_k=1)
    extra = init_gates(config, moe)
    extra[param_path("q_proj", "gate")][1, 0, 0] = np.nan
    y, d = config.num_hidden_layers, config.hidden_size
    extra[param_path("q_proj", "lora_a")] = np.zeros((y, 1, d, 2), np.float32)
    extra[param_path("q_proj", "lora_b")] = np.zeros((y, 1, 2, d), np.float32)
    extra[param_path("q_proj", "scale")] = np.ones((y, 1), np.float32)
    with pytest.raises(
        CheckpointError, match=r"layers/self_attn/q_proj/gate of layer 1 \(as float32, from the"
    ):
        load_llama(world["base"], moe, extra)


# ----------------------------------------------------------------------------- adapter scales


def test_an_alpha_whose_scale_overflows_float32_is_refused(world, tmp_path):
    adapter = shutil.copytree(world["adapter"], tmp_path / "adapter")
    path = edit_json(adapter / "adapter_config.json", lora_alpha=1e308)
    with pytest.raises(ConfigError) as info:
        read_adapter(adapter, LlamaConfig.from_hf(world["base"]))
    message = one_line(info.value)
    assert message.startswith(f"{path}: lora_alpha 1e+308 with r 4 gives model.layers.0.self_attn.q_proj")
    assert "beyond float32's range" in message
    with pytest.raises(ConfigError, match="lora_alpha 1e\\+308"):
        mj.load_model(world["base"], adapters=[adapter])


def test_lora_module_refuses_a_scale_beyond_float32():
    a, b = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(ConfigError, match="scale at most 3.40282e\\+38"):
        LoRAModule(a, b, alpha=1e300, scale=5e299)


def test_layers_to_transform_outside_the_model_is_blamed_on_it(world, tmp_path):
    adapter = shutil.copytree(world["adapter"], tmp_path / "adapter")
    path = edit_json(adapter / "adapter_config.json", layers_to_transform=[1, 5])
    with pytest.raises(ConfigError) as info:
        read_adapter(adapter, LlamaConfig.from_hf(world["base"]))
    assert one_line(info.value) == (
        f"{path}: layers_to_transform [5] lies outside the base model, which has 2 layers (0 to 1)"
    )


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_theta": "abc", "rope_parameters": None}, "rope_theta must be a finite number > 0, got 'abc'"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite number > 0, got nan"),
        ({"rms_norm_eps": math.inf}, "rms_norm_eps must be a finite number > 0, got inf"),
        ({"rms_norm_eps": True}, "rms_norm_eps must be a finite number > 0, got True"),
        ({"rope_theta": -5, "rope_parameters": None}, "rope_theta must be a finite number > 0, got -5"),
        (
            {"rope_parameters": None, "rope_scaling": {"rope_type": "linear", "factor": math.nan}},
            "rope_scaling: factor must be a finite number > 0, got nan",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
            "rope_parameters: rope_theta must be a finite number > 0, got 'big'",
        ),
        (
            {"eos_token_id": "</s>"},
            "eos_token_id must be a token id (an integer >= 0), a list of them or null, got '</s>'",
        ),
        ({"bos_token_id": 1.5}, "bos_token_id must be a token id (an integer >= 0) or null, got 1.5"),
        ({"pad_token_id": "0"}, "pad_token_id must be an integer or null, got '0'"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
        ({"num_attention_heads": 8.0}, "num_attention_heads must be a positive integer, got 8.0"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"max_position_embeddings": None}, "max_position_embeddings must be a positive integer, got None"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ],
    ids=lambda v: re.sub(r"\W+", "-", str(v))[:40] if isinstance(v, dict) else "",
)
def test_config_values_of_the_wrong_type_or_not_finite(base, changes, message):
    path = edit_json(os.path.join(base, "config.json"), **changes)
    with pytest.raises(ConfigError) as info:
        mj.load_model(base)
    assert one_line(info.value) == f"{path}: {message}"


def test_a_nan_config_value_cannot_be_built_directly():
    with pytest.raises(ConfigError, match="rms_norm_eps must be a finite number > 0, got nan"):
        LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=4,
            rms_norm_eps=math.nan,
        )


def test_a_shard_index_whose_weight_map_is_a_list(tmp_path):
    _, folder = make_hf_model(tmp_path / "sharded", max_shard_size="40KB")
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    for weight_map, got in ((list(data["weight_map"]), "a list"), ({"lm_head.weight": 3}, "")):
        with open(index, "w") as f:
            json.dump({**data, "weight_map": weight_map}, f)
        with pytest.raises(CheckpointError) as info:
            mj.load_model(folder)
        assert one_line(info.value).startswith(f"{index}: ")
        assert (
            "weight_map must map tensor names to shard files, got a list" if got else "the shard 3"
        ) in str(info.value)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-20, 1.0, 1e20, 3e38])
def test_routing_weights_are_finite_and_sum_to_one_for_any_temperature(temperature):
    rng = np.random.default_rng(0)
    x, gate = (
        rng.standard_normal((64, 16)).astype(np.float32),
        rng.standard_normal((16, 5)).astype(np.float32),
    )
    routing = route(jnp.asarray(x), jnp.asarray(gate), RoutingSettings(jnp.float32(temperature), top_k=3))
    weights = np.asarray(routing.weights)
    assert np.isfinite(weights).all() and np.allclose(weights.sum(-1), 1.0, atol=1e-6)
    if temperature <= 1e-20:  # one-hot on the top adapter (no exact ties here)
        assert (weights[:, 0] == 1.0).all()


def test_tempered_softmax_matches_softmax_and_shares_exact_ties():
    z = jnp.array([[3.0, 2.5, -1.0], [1.0, 1.0, 0.5]])
    np.testing.assert_allclose(
        tempered_softmax(z, jnp.float32(2.0)),
        jnp.exp(z / 2) / jnp.exp(z / 2).sum(-1, keepdims=True),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(tempered_softmax(z, jnp.float32(1e-45)), [[1, 0, 0], [0.5, 0.5, 0]])


def test_model_call_with_a_tiny_temperature_gives_finite_logits(world):
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(world["base"], adapters={"a": world["adapter"], "b": world["adapter"]}, top_k=2)
    ids = np.arange(12).reshape(1, 12)
    out = model(ids, temperature=1e-45, return_routing=True)
    assert np.isfinite(np.asarray(out.logits)).all()
    assert all(np.isfinite(np.asarray(r.weights)).all() for r in out.routing.values())
