"""New adapters as PEFT initialises them (the start of `train-lora`): PEFT reads what we write,
step 0 equals the base model, and bad settings are named."""

from __future__ import annotations

import os

import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import make_hf_model, max_abs, torch_logits

import meteora_jax as mj
from meteora_jax.config import PROJECTIONS
from meteora_jax.errors import ConfigError
from meteora_jax.io.peft import LoRAAdapter, LoRAModule
from meteora_jax.io.peft_write import write_adapter
from meteora_jax.training.lora_init import new_adapter, parse_targets

pytestmark = pytest.mark.filterwarnings("ignore:no gates given")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("base"))


def test_new_adapter_loads_in_peft_and_starts_as_the_base(base, tmp_path):
    model, base_dir = base
    config = mj.LlamaConfig.from_hf(base_dir)
    adapter = new_adapter("task", config, rank=4, alpha=8.0, targets="q_proj,v_proj,down_proj", layers=[1])
    write_adapter(adapter, tmp_path / "task", config=config)
    settings = peft.PeftConfig.from_pretrained(os.fspath(tmp_path / "task"))
    assert (settings.r, settings.lora_alpha) == (4, 8.0)
    assert set(settings.target_modules) == {"q_proj", "v_proj", "down_proj"}
    peft_model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        os.fspath(tmp_path / "task"),
    ).eval()
    a = peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    np.testing.assert_array_equal(a.detach().numpy(), adapter.modules[(1, "q_proj")].a)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 9))
    ours = mj.load_model(base_dir, adapters={"task": os.fspath(tmp_path / "task")}, top_k=1)
    np.testing.assert_allclose(np.asarray(ours(ids).logits), torch_logits(model, ids), atol=1e-4)
    # B = 0: no change (up to the reloaded model's own rounding; the checks below are exact)
    assert max_abs(torch_logits(peft_model, ids), torch_logits(model, ids)) <= 1e-5


def test_peft_init_bounds_and_rslora():
    config = mj.LlamaConfig.from_hf({**transformers.LlamaConfig(hidden_size=64, intermediate_size=96,
                                     num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                     vocab_size=50).to_dict(), "model_type": "llama"})  # fmt: skip
    adapter = new_adapter("t", config, rank=16, alpha=4.0, use_rslora=True, seed=3)
    module = adapter.modules[(0, "down_proj")]
    assert np.abs(module.a).max() <= 1 / np.sqrt(96) and np.abs(module.a).max() > 0.8 / np.sqrt(96)
    assert not module.b.any() and module.scale == pytest.approx(4.0 / 4.0)  # alpha / sqrt(r)
    assert len(adapter.modules) == 2 * 7 and parse_targets("all-linear") == parse_targets(list(PROJECTIONS))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), r"--rank must be an integer >= 1, got 0"),
        (dict(alpha=0.0), r"--alpha must be a finite number > 0, got 0.0"),
        (dict(alpha=float("inf")), r"--alpha must be a finite number > 0, got inf"),
        (
            dict(layers=[0, 7]),
            r"--layers \[0, 7\]: \[7\] outside the base model, which has 2 layers \(0 to 1\)",
        ),
        (dict(targets="q_proj,qkv"), r"--targets 'q_proj,qkv': unknown target module qkv"),
    ],
)
def test_bad_settings_are_named(base, kwargs, message):
    config = mj.LlamaConfig.from_hf(base[1])
    settings = {"rank": 4, "alpha": 8.0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        new_adapter("task", config, **settings)


def test_nonzero_adapter_through_our_writer_equals_peft(base, tmp_path):
    """A trained (non-zero B) adapter written by us gives PEFT's logits in our model."""
    model, base_dir = base
    config = mj.LlamaConfig.from_hf(base_dir)
    fresh = new_adapter("task", config, rank=4, alpha=8.0, targets="all-linear", seed=1)
    rng = np.random.default_rng(2)
    trained = LoRAAdapter(
        "task",
        {
            k: LoRAModule.from_alpha(m.a, rng.normal(0, 0.1, m.b.shape), m.alpha)
            for k, m in fresh.modules.items()
        },
    )
    write_adapter(trained, tmp_path / "task", config=config)
    peft_model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        os.fspath(tmp_path / "task"),
    ).eval()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    ours = mj.load_model(base_dir, adapters={"task": os.fspath(tmp_path / "task")}, top_k=1)
    want = torch_logits(peft_model, ids)
    assert max_abs(ours(ids).logits, want) <= 1e-4 and max_abs(want, torch_logits(model, ids)) > 1e-2
