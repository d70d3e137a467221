"""Every user-caused error: its exception type, and a message naming the file, tensor or setting."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_hf_model

import meteora_jax as mj
from meteora_jax.errors import CheckpointError, ConfigError, MeteoRAError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A valid one-file checkpoint (hidden 64, 8 heads, 2 kv heads, head_dim 8, vocab 211)."""
    return make_hf_model(tmp_path_factory.mktemp("base"))[1]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("sharded"), max_shard_size="40KB")[1]


@pytest.fixture(scope="module")
def model(base_dir):
    return mj.load_model(base_dir)


@pytest.fixture
def ckpt(base_dir, tmp_path):
    """A private copy of the valid checkpoint, for a test to break."""
    return shutil.copytree(base_dir, tmp_path / "ckpt")


def _edit_weights(folder, edit):
    path = os.path.join(folder, WEIGHTS)
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


def _named(text) -> str:
    return re.escape(os.fspath(text))


# --- folders and files --------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"{_named(missing)} does not exist"):
        mj.load_model(missing)


def test_folder_without_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no config.json found at {_named(ckpt / 'config.json')}"):
        mj.load_model(ckpt)


def test_folder_without_weights(ckpt):
    os.remove(ckpt / WEIGHTS)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS} or {INDEX} in {_named(ckpt)}$"):
        mj.load_model(ckpt)


def test_folder_with_only_pytorch_bin_says_so(ckpt):
    os.remove(ckpt / WEIGHTS)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"found pytorch_model\.bin: convert .* to safetensors"):
        mj.load_model(ckpt)


def test_unsupported_model_type(ckpt):
    config_path = _edit_config(ckpt, model_type="mistral")
    with pytest.raises(ConfigError, match=f"{_named(config_path)}: model_type 'mistral' is not supported"):
        mj.load_model(ckpt)


def test_unknown_rope_type(ckpt):
    config_path = _edit_config(
        ckpt, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    )
    with pytest.raises(ConfigError, match=f"{_named(config_path)}: rope type 'yarn' is not supported"):
        mj.load_model(ckpt)


# --- tensors ------------------------------------------------------------------------------


def test_missing_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=f"{_named(ckpt)}: .*missing tensor model.layers.1.mlp.up_proj.weight"
    ):
        mj.load_model(ckpt)


def test_missing_lm_head_when_not_tied(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head\.weight"):
        mj.load_model(ckpt)


def test_config_with_more_layers_than_weights(ckpt):
    _edit_config(ckpt, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.self_attn\.q_proj\.weight"):
        mj.load_model(ckpt)


def test_unexpected_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"
    ):
        mj.load_model(ckpt)


def test_tensor_for_a_layer_the_config_lacks(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(112, 64)}))
    with pytest.raises(
        CheckpointError,
        match=r"unexpected tensor model\.layers\.7\.mlp\.up_proj\.weight \(config has 2 layers\)",
    ):
        mj.load_model(ckpt)


def test_misshaped_tensor_shows_found_and_expected(ckpt):
    # k_proj is (num_key_value_heads * head_dim, hidden) = (16, 64) in torch layout.
    _edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(24, 64)}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(24, 64\), expected \(16, 64\)",
    ):
        mj.load_model(ckpt)


def test_integer_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(
        CheckpointError, match=r"tensor model\.norm\.weight has dtype int32, expected a float type"
    ):
        mj.load_model(ckpt)


def test_all_problems_reported_at_once(ckpt):
    def edit(t):
        t.pop("model.norm.weight")
        t["model.layers.0.mlp.down_proj.weight"] = torch.ones(64, 64)
        t["extra.weight"] = torch.ones(3)

    _edit_weights(ckpt, edit)
    with pytest.raises(CheckpointError) as info:
        mj.load_model(ckpt)
    message = str(info.value)
    for part in (
        "missing tensor model.norm.weight",
        "unexpected tensor extra.weight",
        "down_proj.weight has shape",
    ):
        assert part in message


def test_index_names_missing_shard(sharded_dir, tmp_path):
    folder = shutil.copytree(sharded_dir, tmp_path / "ckpt")
    with open(folder / INDEX) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(folder / shard)
    with pytest.raises(CheckpointError, match=f"{_named(folder / INDEX)}: shard '{shard}' is missing"):
        mj.load_model(folder)


def test_index_with_tensor_not_in_its_shard(sharded_dir, tmp_path):
    folder = shutil.copytree(sharded_dir, tmp_path / "ckpt")
    with open(folder / INDEX) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(key)} is not in shard {shards[1]}"):
        mj.load_model(folder)


def test_invalid_index_json(sharded_dir, tmp_path):
    folder = shutil.copytree(sharded_dir, tmp_path / "ckpt")
    (folder / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f"{_named(folder / INDEX)}: not a valid safetensors index"):
        mj.load_model(folder)


def test_index_that_is_not_json_is_named(sharded_dir, tmp_path):
    folder = shutil.copytree(sharded_dir, tmp_path / "ckpt")
    (folder / INDEX).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=f"{_named(folder / INDEX)}: not valid JSON"):
        mj.load_model(folder)


def test_truncated_safetensors(ckpt):
    path = ckpt / WEIGHTS
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"{_named(path)}: tensor '.*' points outside the file"):
        mj.load_model(ckpt)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "too short"),
        (b"\xff" * 64, "bad header length"),
        (b"\x10" + b"\0" * 7 + b"not json" * 2, "header is not JSON"),
    ],
    ids=["too-short", "bad-header-length", "header-not-json"],
)
def test_corrupt_safetensors(ckpt, content, why):
    path = ckpt / WEIGHTS
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{_named(path)}: not a safetensors file \\({why}"):
        mj.load_model(ckpt)


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [211, 5000, -1])
def test_ids_outside_vocabulary(model, bad):
    ids = np.array([[3, 4, bad, 5]])
    with pytest.raises(MeteoRAError, match=rf"input_ids contain {bad}, outside the vocabulary \[0, 211\)"):
        model(ids)


def test_ids_wrong_rank_or_dtype(model):
    with pytest.raises(MeteoRAError, match=r"input_ids must be a non-empty integer array \(batch, length\)"):
        model(np.array([1, 2, 3]))
    with pytest.raises(MeteoRAError, match=r"input_ids must be a non-empty integer array .*float"):
        model(np.array([[1.0, 2.0]]))


def test_attention_mask_wrong_shape(model):
    ids = np.ones((2, 6), np.int32)
    with pytest.raises(MeteoRAError, match=r"attention_mask has shape \(2, 5\), expected \(2, 6\)"):
        model(ids, attention_mask=np.ones((2, 5), np.int32))


def test_positions_wrong_shape(model):
    with pytest.raises(MeteoRAError, match=r"positions has shape \(6,\), expected \(1, 6\)"):
        model(np.ones((1, 6), np.int32), positions=np.arange(6))


def test_cache_without_room(model):
    cache = model.init_cache(1, 8)
    cache = model(np.ones((1, 6), np.int32), cache=cache).cache
    with pytest.raises(MeteoRAError, match=r"cache has room for 2 more tokens, got 3 \(max_length=8\)"):
        model(np.ones((1, 3), np.int32), cache=cache)
    model(np.ones((1, 2), np.int32), cache=cache)  # exactly full is fine


def test_cache_with_other_batch(model):
    cache = model.init_cache(2, 8)
    with pytest.raises(MeteoRAError, match=r"cache holds 2 rows, input_ids has 3"):
        model(np.ones((3, 2), np.int32), cache=cache)


# --- load_model settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"param_dtype": "float64"}, "param_dtype='float64'"),
        ({"backend": "nope"}, "backend='nope'"),
        ({"attention": "flash"}, "attention='flash'"),
        ({"top_k": 0}, "top_k must be a positive integer, got 0"),
        ({"top_k": 1.5}, "top_k must be a positive integer, got 1.5"),
        ({"temperature": 0}, "temperature must be a number > 0, got 0"),
        ({"temperature": float("nan")}, "temperature must be a number > 0, got nan"),
    ],
)
def test_bad_load_model_settings(base_dir, kwargs, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        mj.load_model(base_dir, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"adapters": ["some/adapter"]}, "some/adapter"), ({"adapters": {"a": "x"}}, "x")]
)
def test_missing_adapter_folder(base_dir, kwargs, named):
    with pytest.raises(FileNotFoundError, match=f"adapter folder {named} does not exist"):
        mj.load_model(base_dir, **kwargs)


def test_user_errors_are_value_errors():
    for cls in (ConfigError, CheckpointError, MeteoRAError):
        assert issubclass(cls, ValueError)
