"""LlamaConfig.from_hf on both config.json layouts, the to_hf_dict round trip, and refusals."""

import json
import re

import pytest

from meteora_jax.config import LlamaConfig, RopeScaling
from meteora_jax.errors import ConfigError

BASE = {
    "model_type": "llama",
    "vocab_size": 211,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
}


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def test_classic_layout_derives_head_dim_and_defaults():
    cfg = LlamaConfig.from_hf({**BASE, "rope_theta": 500000.0, "rms_norm_eps": 1e-5})
    assert cfg.head_dim == 8  # hidden_size / num_attention_heads
    assert cfg.num_key_value_heads == 8  # no num_key_value_heads: plain multi-head attention
    assert cfg.num_groups == 1
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_id == (2,)
    assert cfg.tie_word_embeddings is False


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_classic_rope_scaling_accepts_type_and_rope_type(key):
    cfg = LlamaConfig.from_hf({**BASE, "rope_theta": 1e4, "rope_scaling": {key: "linear", "factor": 4.0}})
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)


def test_classic_llama3_scaling():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig.from_hf(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": scaling, "max_position_embeddings": 131072}
    )
    assert cfg.rope_scaling == RopeScaling(**scaling)
    assert cfg.max_position_embeddings == 131072


def test_transformers5_rope_parameters_layout():
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 250.0}
    cfg = LlamaConfig.from_hf({**BASE, "rope_parameters": params})
    assert cfg.rope_theta == 250.0
    assert cfg.rope_scaling == RopeScaling(rope_type="dynamic", factor=2.0)
    default = LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 99.0}})
    assert default.rope_theta == 99.0 and default.rope_scaling is None


def test_explicit_head_dim_gqa_and_eos_list():
    cfg = LlamaConfig.from_hf(
        {
            **BASE,
            "head_dim": 16,
            "num_key_value_heads": 2,
            "eos_token_id": [128001, 128009],
            "bos_token_id": 5,
        }
    )
    assert cfg.head_dim == 16
    assert cfg.num_key_value_heads == 2
    assert cfg.num_groups == 4
    assert cfg.eos_token_id == (128001, 128009)
    assert cfg.bos_token_id == 5


def test_reads_folder_and_config_path(tmp_path):
    path = _write(tmp_path, {**BASE, "num_key_value_heads": 4})
    from_dir = LlamaConfig.from_hf(tmp_path)
    from_file = LlamaConfig.from_hf(str(path))
    assert from_dir == from_file == LlamaConfig.from_hf({**BASE, "num_key_value_heads": 4})


@pytest.mark.parametrize(
    "raw",
    [
        BASE,
        {**BASE, "head_dim": 16, "num_key_value_heads": 2, "tie_word_embeddings": True, "pad_token_id": 0},
        {**BASE, "eos_token_id": [3, 4], "rope_scaling": {"type": "linear", "factor": 2.5}},
        {**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e6}},
        {
            **BASE,
            "rope_theta": 5e5,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ],
)
def test_to_hf_dict_round_trip(raw):
    cfg = LlamaConfig.from_hf(raw)
    out = cfg.to_hf_dict()
    assert out["model_type"] == "llama"
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert LlamaConfig.from_hf(out) == cfg


def test_refuses_other_model_type(tmp_path):
    path = _write(tmp_path, {**BASE, "model_type": "mistral"})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*model_type 'mistral'"):
        LlamaConfig.from_hf(tmp_path)


def test_refuses_missing_model_type():
    raw = dict(BASE)
    del raw["model_type"]
    with pytest.raises(ConfigError, match="model_type None"):
        LlamaConfig.from_hf(raw)


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
def test_refuses_unknown_rope_type(tmp_path, layout):
    scaling = {"rope_type": "yarn", "factor": 4.0}
    path = _write(tmp_path, {**BASE, layout: scaling})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*rope type 'yarn'"):
        LlamaConfig.from_hf(path)


def test_refuses_incomplete_llama3_scaling(tmp_path):
    path = _write(tmp_path, {**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*low_freq_factor, high_freq_factor"):
        LlamaConfig.from_hf(path)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"])
def test_refuses_missing_required_field(tmp_path, field):
    raw = dict(BASE)
    del raw[field]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: missing field\(s\) {field}"):
        LlamaConfig.from_hf(tmp_path)


def test_refuses_heads_not_dividing_kv_heads():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(8\).*num_key_value_heads \(3\)"):
        LlamaConfig.from_hf({**BASE, "num_key_value_heads": 3})


def test_refuses_hidden_not_multiple_of_heads_without_head_dim():
    with pytest.raises(ConfigError, match=r"hidden_size \(60\).*num_attention_heads \(8\).*head_dim"):
        LlamaConfig.from_hf({**BASE, "hidden_size": 60})


def test_refuses_bad_json(tmp_path):
    path = _write(tmp_path, '{"model_type": "llama", "vocab_size": ')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


def test_refuses_json_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: expected a JSON object"):
        LlamaConfig.from_hf(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        LlamaConfig.from_hf(tmp_path)  # folder exists, config.json does not
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LlamaConfig.from_hf(missing)


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**BASE, "model_type": "gpt2"})
