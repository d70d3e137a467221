"""Our Orbax checkpoint: gates + stacked adapters + scales + metadata, never the base weights.

A fused model (mixed ranks, rsLoRA, partial targets) whose LoRA stacks were changed after
loading, as training would, is saved and loaded back: the logits must be identical with and
without passing the adapters again, and every mismatch is refused with a clear message.
"""

from __future__ import annotations

import json
import os
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import make_hf_model, make_peft_adapter, max_abs

import meteora_jax as mj
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.io import checkpoint
from meteora_jax.io.stacking import AdapterInfo

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "wide": dict(r=6, lora_alpha=12, target_modules="all-linear"),
    "rs": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    _, base = make_hf_model(root / "base")
    dirs = {
        n: make_peft_adapter(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(base, adapters=dirs, top_k=2, temperature=1.5, seed=3)
    q_proj = model.module.layers.self_attn.q_proj  # as if training had moved a LoRA stack
    q_proj.lora_b[...] = q_proj.lora_b[...] + 0.05 * jnp.ones_like(q_proj.lora_b[...]).at[:, 2].set(0)
    ckpt = checkpoint.save_checkpoint(root / "ckpt", model, base)
    return dict(root=root, base=base, dirs=dirs, model=model, ckpt=ckpt)


def ids_of(seed, batch=2, length=29, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def no_leftovers(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def test_load_without_adapters_gives_identical_logits(world, record_error):
    loaded = mj.load_model(world["base"], gates=world["ckpt"])
    assert loaded.adapter_names == tuple(ADAPTERS)
    assert (loaded.moe.top_k, loaded.moe.temperature) == (2, 1.5), "routing defaults come from the checkpoint"
    ids = ids_of(1)
    err = record_error(
        "checkpoint, no adapters given", max_abs(loaded(ids).logits, world["model"](ids).logits)
    )
    assert err == 0
    assert [i.to_json() for i in loaded.adapter_info] == [i.to_json() for i in world["model"].adapter_info]


def test_load_with_adapters_again_gives_identical_logits(world, record_error):
    loaded = mj.load_model(world["base"], adapters=world["dirs"], gates=world["ckpt"])
    assert (loaded.moe.top_k, loaded.moe.temperature) == (2, 1.5)
    ids = ids_of(2)
    err = record_error(
        "checkpoint, adapters given again", max_abs(loaded(ids).logits, world["model"](ids).logits)
    )
    assert err == 0, "the checkpoint's (trained) stacks win over the adapter folders'"
    override = mj.load_model(world["base"], gates=world["ckpt"], top_k=1, temperature=3.0)
    assert (override.moe.top_k, override.moe.temperature) == (1, 3.0)


def test_metadata_and_contents(world):
    ckpt = checkpoint.restore(world["ckpt"])
    meta = ckpt.meta
    assert ckpt.step == 0 and checkpoint.checkpoint_steps(world["ckpt"]) == [0]
    assert meta.adapter_names == tuple(ADAPTERS) and meta.rank == 6
    assert meta.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert meta.base_fingerprint == checkpoint.base_fingerprint(world["base"])
    assert meta.base_config == mj.LlamaConfig.from_hf(world["base"]) and meta.base_path == world["base"]
    infos = {i.name: i for i in meta.adapters}
    assert (
        infos["rs"].use_rslora
        and infos["rs"].ranks[(1, "down_proj")] == 2
        and infos["wide"].alphas[(0, "q_proj")] == 12
    )
    assert infos["plain"].source == os.path.abspath(world["dirs"]["plain"])
    assert all(p[-1] in checkpoint.LEAVES for p in ckpt.params), "never the base weights"
    gate = ckpt.params[("layers", "mlp", "up_proj", "gate")]
    assert gate.shape == (2, 64, 3) and isinstance(gate, np.ndarray)
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(world["ckpt"]) for f in fs)
    assert stored < os.path.getsize(os.path.join(world["base"], "model.safetensors"))
    data = json.loads(json.dumps(meta.to_json()))
    assert checkpoint.CheckpointMeta.from_json(data, "x") == meta and data["version"] == checkpoint.VERSION


def test_fingerprint_is_fast_and_ignores_sharding_and_cosmetics(tmp_path):
    _, single = make_hf_model(tmp_path / "single", seed=4)
    _, sharded = make_hf_model(tmp_path / "sharded", seed=4, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    t0 = time.perf_counter()
    fingerprint = checkpoint.base_fingerprint(single)
    assert time.perf_counter() - t0 < 1.0
    assert fingerprint.startswith("sha256:") and checkpoint.base_fingerprint(sharded) == fingerprint
    config_path = tmp_path / "single" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "transformers_version": "0.0.1", "dtype": "bfloat16"}))
    assert checkpoint.base_fingerprint(single) == fingerprint
    _, other = make_hf_model(tmp_path / "other", seed=5)
    assert checkpoint.base_fingerprint(other) != fingerprint


def test_training_steps_with_extra_items(world, tmp_path):
    folder = tmp_path / "run"
    model = world["model"]
    checkpoint.save_checkpoint(folder, model, world["base"])
    opt_state = {"mu": np.arange(6.0, dtype=np.float32).reshape(2, 3), "count": np.int32(7)}
    for step in (5, 10):
        checkpoint.save_checkpoint(
            folder, model, world["base"], step=step, extra_items={"opt": opt_state}, max_to_keep=2
        )
    assert checkpoint.checkpoint_steps(folder) == [5, 10], "keep-N"
    latest = checkpoint.restore(folder, extra_items={"opt": None})
    assert latest.step == 10 and np.array_equal(latest.extra["opt"]["mu"], opt_state["mu"])
    assert int(latest.extra["opt"]["count"]) == 7
    assert checkpoint.restore(folder, step=5).step == 5
    with pytest.raises(FileExistsError, match="already holds step 10"):
        checkpoint.save_checkpoint(folder, model, world["base"], step=10)
    with pytest.raises(CheckpointError, match="has no step 3"):
        checkpoint.restore(folder, step=3)


# ----------------------------------------------------------------------------- refusals


def test_refuses_a_different_base(world, tmp_path):
    _, other = make_hf_model(tmp_path / "other", seed=8)
    with pytest.raises(CheckpointError) as info:
        mj.load_model(other, gates=world["ckpt"])
    message = str(info.value)
    meta = checkpoint.restore(world["ckpt"]).meta
    assert world["ckpt"] in message and world["base"] in message and other in message
    assert meta.base_fingerprint in message and checkpoint.base_fingerprint(other) in message
    _, wider = make_hf_model(tmp_path / "wider", seed=8, intermediate_size=96)
    with pytest.raises(CheckpointError, match="intermediate_size 112 vs 96"):
        mj.load_model(wider, gates=world["ckpt"])


def test_refuses_mismatched_adapters(world, tmp_path):
    dirs = world["dirs"]
    swapped = {"wide": dirs["wide"], "plain": dirs["plain"], "rs": dirs["rs"]}
    with pytest.raises(
        ConfigError, match=r"\['plain', 'wide', 'rs'\], but adapters= gives \['wide', 'plain', 'rs'\]"
    ):
        mj.load_model(world["base"], adapters=swapped, gates=world["ckpt"])
    fewer = {"plain": dirs["plain"], "wide": dirs["wide"]}
    with pytest.raises(ConfigError, match="omit adapters="):
        mj.load_model(world["base"], adapters=fewer, gates=world["ckpt"])
    other = make_peft_adapter(
        world["base"], tmp_path / "plain", seed=1, r=3, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    with pytest.raises(
        CheckpointError, match="adapter 'plain' .* layer 0 q_proj: rank 3 given vs 4 stored"
    ) as info:
        mj.load_model(world["base"], adapters={**dirs, "plain": other}, gates=world["ckpt"])
    assert world["ckpt"] in str(info.value)


def test_refuses_existing_output_and_leaves_nothing_half_written(world, tmp_path, monkeypatch):
    model, base = world["model"], world["base"]
    folder = tmp_path / "ckpt"
    checkpoint.save_checkpoint(folder, model, base)
    before = sorted(os.listdir(folder / "0"))
    with pytest.raises(FileExistsError, match="already holds step 0"):
        checkpoint.save_checkpoint(folder, model, base)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_checkpoint(foreign, model, base)
    assert os.listdir(foreign) == ["notes.txt"]

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.CheckpointManager, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(folder, model, base, force=True)
    assert sorted(os.listdir(folder / "0")) == before, "a failed save leaves the old checkpoint intact"
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path / "fresh", model, base)
    assert not (tmp_path / "fresh").exists() and no_leftovers(tmp_path)
    monkeypatch.undo()
    checkpoint.save_checkpoint(folder, model, base, force=True)
    assert checkpoint.checkpoint_steps(folder) == [0]


def test_refuses_folders_that_are_not_checkpoints(world, tmp_path):
    with pytest.raises(CheckpointError, match="not a meteora-jax checkpoint folder"):
        mj.load_model(world["base"], gates=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mj.load_model(world["base"], gates=tmp_path / "missing")
    folder = tmp_path / "future"
    checkpoint.save_checkpoint(folder, world["model"], world["base"])
    meta_file = folder / "0" / "meta" / "metadata"  # Orbax's JsonCheckpointHandler file
    data = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        mj.load_model(world["base"], gates=folder)
    assert isinstance(checkpoint.restore(world["ckpt"]).meta.adapters[0], AdapterInfo)
