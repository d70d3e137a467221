"""The demo base's pre-training: every weight trains, copying is learned, and the keyword readout
is the objective its docstring states."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax.data.prompts import load_tokenizer
from meteora_jax.data.tasks import Sample
from meteora_jax.demo.pretrain import PretrainSettings, Readout, pretrain, pretraining_objective
from meteora_jax.demo.synthetic import LETTERS, write_tiny_setup
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
    history = pretrain(
        model, tokenizer, samples, PretrainSettings(steps=40, batch_size=8, lr=1e-2), mesh, progress=False
    )
    losses = [m["lm_loss"] for m in history]
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


def test_the_objective_against_a_numpy_statement():
    """LM cross entropy over answer tokens of answered questions (labels < answered), plus weight x
    a softmax over the keyword tokens' logits against the question keyword, at every answer token
    and at every prompt token from its own keyword on (the last keyword read in its sample)."""
    rng = np.random.default_rng(0)
    b, s, v = 2, 8, 11
    keywords = (7, 3, 9)
    logits = rng.normal(size=(b, s, v)).astype(np.float32)
    batch = {
        # row 0: one sample, keyword 9 (label 2) read at slot 1, then keyword 7 (label 0) at slot 4;
        # row 1: two packed samples (positions restart at slot 4), keyword 3 (label 1) in the first.
        "input_ids": np.array([[1, 9, 5, 5, 7, 5, 5, 5], [1, 3, 5, 5, 1, 5, 9, 5]], np.int32),
        "positions": np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]], np.int32),
        "lm_targets": rng.integers(0, v, (b, s)).astype(np.int32),
        "lm_weights": np.array([[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 1]], np.int32),
        "gate_labels": np.array([[2, 2, 2, 0, 0, 2, 0, -1], [1, 1, 1, 2, 1, 2, 2, 2]], np.int32),
    }
    readout = Readout(keyword_ids=keywords, answered=2)
    loss, metrics = pretraining_objective(jnp.asarray(logits), batch, readout, jnp.float32(0.5))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    def last_keyword(i, t):  # the keyword token last read in (i, t)'s sample, up to t
        start = max(u for u in range(t + 1) if batch["positions"][i, u] == 0)
        seen = [batch["input_ids"][i, u] for u in range(start, t + 1) if batch["input_ids"][i, u] in keywords]
        return seen[-1] if seen else None

    lm_terms, readout_terms, right = [], [], []
    for i in range(b):
        for t in range(s):
            label = batch["gate_labels"][i, t]
            answer = batch["lm_weights"][i, t] == 1
            if answer and label < 2:
                lm_terms.append(-log_softmax(logits[i, t])[batch["lm_targets"][i, t]])
            if not (answer or (label >= 0 and last_keyword(i, t) == keywords[label])):
                continue
            keyword_logits = logits[i, t, list(keywords)]
            readout_terms.append(-log_softmax(keyword_logits)[label])
            right.append(keyword_logits.argmax() == label)
    # row 0: slots 1, 2 (after 9, label 2), 4 (7, label 0), 5, 6 (answers); row 1: 1, 2, 3, 6, 7
    assert len(lm_terms) == 2 and len(readout_terms) == 10
    np.testing.assert_allclose(metrics["lm_loss"], np.mean(lm_terms), rtol=1e-5)
    np.testing.assert_allclose(metrics["readout_loss"], np.mean(readout_terms), rtol=1e-5)
    np.testing.assert_allclose(metrics["readout_accuracy"], np.mean(right), rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(lm_terms) + 0.5 * np.mean(readout_terms), rtol=1e-5)
    plain, plain_metrics = pretraining_objective(jnp.asarray(logits), batch, None, jnp.float32(0.5))
    every = [
        -log_softmax(logits[i, t])[batch["lm_targets"][i, t]]
        for i, t in zip(*np.nonzero(batch["lm_weights"]), strict=True)
    ]
    np.testing.assert_allclose(plain, np.mean(every), rtol=1e-5)


def test_the_readout_learns_to_name_each_answer_tokens_question(world):
    """Two keywords with the same answers: only the readout tells them apart, and after a short run
    it names each answer token's keyword while copying is still learned."""
    setup, tokenizer, samples = world
    words = [s.response for s in samples["copy"]]
    mixed = [
        Sample(i % 2, prompt=f"{('copy', 'double')[i % 2]}: {w}", response=w) for i, w in enumerate(words)
    ]
    model = load_llama(setup.base)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    ids = tokenizer.convert_tokens_to_ids(["a", "b"])  # any two tokens serve as the classes
    settings = PretrainSettings(steps=60, batch_size=8, lr=1e-2, readout_start=10, readout_weight=1.0)
    history = pretrain(
        model, tokenizer, {"mixed": mixed}, settings, mesh, readout=Readout(tuple(ids), answered=2),
        progress=False,
    )  # fmt: skip
    assert len(history) == 60 and set(history[0]) == {"lm_loss", "readout_loss", "readout_accuracy"}
    assert np.mean([m["readout_accuracy"] for m in history[-5:]]) > 0.95
    assert np.mean([m["lm_loss"] for m in history[-5:]]) < 0.6 * np.mean([m["lm_loss"] for m in history[:5]])
