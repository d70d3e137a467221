"""train-lora's held-out figures: the teacher-forced exact match is what greedy generation returns,
and the response NLL is the plain per-sample cross-entropy, whatever the padding and batching."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.data.prompts import encode_example, load_tokenizer, pad_token_of
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.sharding import make_mesh
from meteora_jax.training.task_eval import ScoredSample, score

PROMPTS = ["upper: abc", "reverse: hgfedcba", "double: ij", "upper: jjjjjj", "reverse: ab"]
LENGTHS = [2, 5, 3, 6, 4]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    setup = write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")), init_std=0.1, train=16, test=4)
    model = mj.load_model(setup.base)
    tokenizer = load_tokenizer(setup.base)
    greedy = []
    for prompt, n in zip(PROMPTS, LENGTHS, strict=True):
        ids, num_prompt = encode_example(tokenizer, prompt)
        out = mj.generate(model, np.asarray([ids]), max_new_tokens=n, eos_token_id=[])
        greedy.append(
            ScoredSample(np.asarray([*ids, *np.asarray(out.new_tokens)[0]], np.int32), num_prompt, prompt)
        )
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return model, pad_token_of(tokenizer), greedy, mesh, setup.base


def test_greedy_continuations_are_exact_matches_and_changed_ones_are_not(world):
    """References that are the model's own greedy continuations score 100% (so teacher-forced
    argmax agrees with cached decoding); changing one token of a reference fails that sample only."""
    model, pad, greedy, mesh, _ = world
    assert score(model, greedy, mesh, pad_id=pad, batch_size=3)["exact_match"] == 1.0
    changed = list(greedy)
    last = changed[1]
    ids = last.ids.copy()
    ids[-1] = (ids[-1] + 1) % model.config.vocab_size
    changed[1] = ScoredSample(ids, last.num_prompt, last.where)
    result = score(model, changed, mesh, pad_id=pad, batch_size=3)
    assert result["exact_match"] == pytest.approx(4 / 5)
    assert result["token_accuracy"] == pytest.approx(1 - 1 / sum(LENGTHS))


def test_response_nll_is_the_unpadded_per_token_cross_entropy(world):
    """Batched and left-padded (2 rows a batch, a filler row in the last) the NLL equals the mean
    over all response tokens of each sample's own unpadded log-softmax (float32, <= 1e-5)."""
    model, pad, greedy, mesh, _ = world
    total, count = 0.0, 0
    for s in greedy:
        logits = np.asarray(model(s.ids[None]).logits[0], np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for t in range(s.num_prompt, len(s.ids)):
            total -= logp[t - 1, s.ids[t]]
            count += 1
    result = score(model, greedy, mesh, pad_id=pad, batch_size=2)
    assert result["samples"] == 5
    assert abs(result["response_nll"] - total / count) <= 1e-5 * total / count


def test_batches_split_over_the_mesh_as_training_batches_give_the_same_figures(world):
    """With 4 rows over data=2 x fsdp=2 every device holds one row (as a training micro-batch of
    4 would): the figures equal those of one device, and the rows really are split."""
    model, pad, greedy, one, base = world
    mesh = make_mesh(2, 2, 2)
    seen = []
    with jax.set_mesh(mesh):
        on_mesh = mj.load_model(base, mesh=mesh)
        real_call = type(on_mesh).__call__

        def recording(self, ids, *args, **kwargs):
            seen.append(ids.sharding.shard_shape(ids.shape))
            return real_call(self, ids, *args, **kwargs)

        type(on_mesh).__call__ = recording
        try:
            split = score(on_mesh, greedy, mesh, pad_id=pad, batch_size=4)
        finally:
            type(on_mesh).__call__ = real_call
    whole = score(model, greedy, one, pad_id=pad, batch_size=4)
    assert seen and all(shape[0] == 1 for shape in seen)
    assert split["exact_match"] == whole["exact_match"] and split["samples"] == whole["samples"]
    assert abs(split["response_nll"] - whole["response_nll"]) <= 1e-5 * whole["response_nll"]
