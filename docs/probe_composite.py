"""Reproduces the probe figures of docs/demo_design.md and the README's demo section.

    python docs/probe_composite.py DEMO_OUT [GATES]

How well each projection's input says which composite line a token answers: per projection
input, a multinomial logistic regression (optax, full batch) is fitted on the answer tokens of
120 teacher-forced composite-3 prompts and scored on 40 others. Without GATES it probes the
demo's base (DEMO_OUT/setup/base); with GATES (a folder under DEMO_OUT, e.g. `gate`) the fused
model. Prints, per layer and projection, the held-out accuracy over all answer tokens and over
the line-prefix tokens (`2`, `.`, ` `) alone.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import meteora_jax as mj
import meteora_jax.modeling.llama as llama
from meteora_jax.config import PROJECTIONS
from meteora_jax.data.prompts import encode_segments, load_tokenizer
from meteora_jax.demo.synthetic import labelled_composite_samples

PROMPTS, FITTED = 160, 120


def capture_inputs(model, ids: list[int]) -> dict[str, np.ndarray]:
    """{"{layer}.{projection}": (T, D_in)} inputs of every projection, from one eager forward pass."""
    seen: dict[str, list[np.ndarray]] = {}
    plain = llama.project

    def recording(layer, name, x, ctx):
        seen.setdefault(name, []).append(np.asarray(x)[0])
        return plain(layer, name, x, ctx)

    llama.project = recording
    try:
        with jax.disable_jit():
            model.module(jnp.asarray([ids], jnp.int32))
    finally:
        llama.project = plain
    return {f"{i}.{name}": x for name, xs in seen.items() for i, x in enumerate(xs)}


def probe_accuracy(x_train, y_train, x_test, classes: int, steps: int = 400) -> np.ndarray:
    """Predicted classes of `x_test` by a softmax regression fitted on (x_train, y_train)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    params = {"w": jnp.zeros((x_train.shape[1], classes)), "b": jnp.zeros((classes,))}
    optimizer = optax.adam(0.05)

    def loss(p):
        logits = x_train @ p["w"] + p["b"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
        return nll + 1e-3 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return np.asarray((x_test @ params["w"] + params["b"]).argmax(-1))


def main(demo: str, gates: str | None = None) -> None:
    base = os.path.join(demo, "setup", "base")
    tasks = sorted(os.listdir(os.path.join(demo, "setup", "data")))
    model = mj.load_model(base, gates=os.path.join(demo, gates)) if gates else mj.load_model(base)
    tokenizer = load_tokenizer(base)
    inputs, labels, prefix = {}, [], []
    for sample in labelled_composite_samples(tasks, PROMPTS, np.random.default_rng(11), counts=(3,)):
        texts = [s["text"] for s in sample["segments"]]
        ids, lengths = encode_segments(tokenizer, texts)
        label_t = np.repeat([tasks.index(s["task"]) for s in sample["segments"]], lengths)
        closing = max(i for i, text in enumerate(texts) if text.endswith(" [/INST]\n"))
        start = sum(lengths[: closing + 1])  # the answer's first token
        for key, x in capture_inputs(model, ids).items():
            inputs.setdefault(key, []).append(x[start:])
        labels.append(label_t[start:])
        pieces = tokenizer.convert_ids_to_tokens(ids[start:])
        prefix.append(np.array([p[:1].isdigit() or p in (".", "▁") for p in pieces]))
    fitted = sum(len(y) for y in labels[:FITTED])
    y = np.concatenate(labels)
    is_prefix = np.concatenate(prefix)[fitted:]
    layers = model.config.num_hidden_layers
    print(f"{'':>10}" + "".join(f"{p:>16}" for p in PROJECTIONS if f"0.{p}" in inputs))
    for layer in range(layers):
        cells = []
        for projection in PROJECTIONS:
            key = f"{layer}.{projection}"
            if key not in inputs:
                continue
            x = np.concatenate(inputs[key])
            right = probe_accuracy(x[:fitted], y[:fitted], x[fitted:], len(tasks)) == y[fitted:]
            cells.append(f"{right.mean():7.0%} ({right[is_prefix].mean():4.0%})")
        print(f"layer {layer:>4}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main(*sys.argv[1:3])
