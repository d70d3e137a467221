"""The demo base's pre-training: the engine's step with every weight trainable learns to copy."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from meteora_jax.data.prompts import load_tokenizer
from meteora_jax.data.tasks import Sample
from meteora_jax.demo.pretrain import PretrainSettings, pretrain
from meteora_jax.demo.tasks import LETTERS, write_tiny_setup
from meteora_jax.io.hf import load_llama
from meteora_jax.sharding import make_mesh
from meteora_jax.training.loop import TrainingError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    setup = write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")), train=8, test=2)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list(LETTERS), int(rng.integers(3, 7)))) for _ in range(256)]
    samples = {"copy": [Sample(0, prompt=f"copy: {w}", response=w) for w in words]}
    return setup, load_tokenizer(setup.base), samples


def test_pretraining_lowers_the_loss_of_every_weight(world):
    setup, tokenizer, samples = world
    model = load_llama(setup.base)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    losses = pretrain(
        model, tokenizer, samples, PretrainSettings(steps=40, batch_size=8, lr=1e-2), mesh, progress=False
    )
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert all(changed)  # embeddings, norms, attention, MLP and the head all trained


def test_a_non_finite_loss_stops_pretraining(world):
    setup, tokenizer, samples = world
    model = load_llama(setup.base)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    settings = PretrainSettings(steps=20, batch_size=4, lr=1e30)
    with pytest.raises(TrainingError, match=r"pre-training step \d+: the loss is not finite"):
        pretrain(model, tokenizer, samples, settings, mesh, progress=False)
