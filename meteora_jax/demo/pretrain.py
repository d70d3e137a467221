"""The demo base learns the prompt formats and which question each token belongs to: a short
full-model pre-training on copy questions (`[INST] copy: abcd [/INST]` -> `abcd`), alone and as
numbered composite prompts, so it answers in both formats yet can do no task.

A second term, the keyword readout, makes the base's hidden states say which question a token
belongs to, as a real LLM's states say what it is doing: at every answer token, and at every
question token from its keyword on, the LM head's logits of the keyword tokens (`copy`, `lower`,
the tasks' names) are trained to pick that question's keyword. Questions of the demo's tasks are
in the samples, their true answers too, but those answer lines carry no LM loss: the base learns
to recognise a task, never to do it. The readout starts once copying has formed
(`readout_start`); from the first step it keeps copying from forming at the demo's budget.

It runs the training engine's data pipeline (Grain, packing) and optimizer (AdamW, warmup +
cosine, clipping) with every `nnx.Param` of a plain base trainable; nothing is checkpointed (the
demo caches the finished base instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meteora_jax.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from meteora_jax.data.tasks import Sample
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.training.loop import TrainingError
from meteora_jax.training.state import optimizer_transform, shardings_of
from meteora_jax.training.step import batch_sharding
from meteora_jax.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Steps, rows x slots per step and the peak learning rate of the pre-training; the keyword
    readout's weight and the step it starts at (`readout_start` >= `steps`: no readout)."""

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 48
    lr: float = 3e-3
    readout_start: int = 0
    readout_weight: float = 0.3
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, lr=self.lr, warmup_steps=min(20, self.steps), clip_norm=1.0,
            gate_loss_weight=0.0, seed=self.seed,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Readout:
    """The keyword readout's classes: label i of a token (its sample's or segment's label) is the
    question keyword whose token id is `keyword_ids[i]`. Labels >= `answered` mark questions whose
    answers take no LM loss (the tasks the base must not learn)."""

    keyword_ids: tuple[int, ...]
    answered: int


def keyword_just_read(batch: Mapping[str, jax.Array], keyword_ids: Sequence[int]) -> jax.Array:
    """(B, S) float32: 1 at a prompt token whose question keyword is the last keyword token read in
    its sample (the token itself included), i.e. inside a question, from its keyword on. Before the
    keyword (`[INST]`, a line's number) the question is not yet known: no readout there."""
    ids_bs, labels_bs = batch["input_ids"], batch["gate_labels"]
    slot_s = jnp.arange(ids_bs.shape[1])
    start_bs = jax.lax.cummax(jnp.where(batch["positions"] == 0, slot_s, 0), axis=1)  # sample start
    hit_bsk = ids_bs[..., None] == jnp.asarray(keyword_ids)
    last_bsk = jax.lax.cummax(jnp.where(hit_bsk, slot_s[:, None], -1), axis=1)  # each keyword's last slot
    own_bs = jnp.take_along_axis(last_bsk, jnp.maximum(labels_bs, 0)[..., None], -1)[..., 0]
    just = (labels_bs >= 0) & (own_bs >= start_bs) & (own_bs == last_bsk.max(-1))
    return just.astype(jnp.float32)


def pretraining_objective(
    logits_bsv: jax.Array, batch: Mapping[str, jax.Array], readout: Readout | None, weight: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LM cross entropy over the answer tokens (`lm_weights`) of answered questions, plus `weight`
    x the readout's cross entropy: at each answer token, and at each prompt token from its
    question's keyword on (`keyword_just_read`), a softmax over the keyword tokens' logits against
    its question's keyword. Each term is a mean over its tokens. Returns (loss, metrics)."""
    logits = logits_bsv.astype(jnp.float32)
    nll_bs = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["lm_targets"][..., None], -1)[..., 0]
    answer_bs = batch["lm_weights"].astype(jnp.float32)
    if readout is None:
        lm = (nll_bs * answer_bs).sum() / jnp.maximum(answer_bs.sum(), 1.0)
        return lm, {"lm_loss": lm}
    labels_bs = batch["gate_labels"]
    lm_bs = answer_bs * (labels_bs < readout.answered)
    lm = (nll_bs * lm_bs).sum() / jnp.maximum(lm_bs.sum(), 1.0)
    keyword_bsk = logits[..., jnp.asarray(readout.keyword_ids)]
    keyword_nll_bs = -jnp.take_along_axis(
        jax.nn.log_softmax(keyword_bsk), jnp.maximum(labels_bs, 0)[..., None], -1
    )[..., 0]
    read_bs = jnp.maximum(answer_bs, keyword_just_read(batch, readout.keyword_ids))
    count = jnp.maximum(read_bs.sum(), 1.0)
    readout_loss = (keyword_nll_bs * read_bs).sum() / count
    accuracy = ((keyword_bsk.argmax(-1) == labels_bs) * read_bs).sum() / count
    metrics = {"lm_loss": lm, "readout_loss": readout_loss, "readout_accuracy": accuracy}
    return lm + weight * readout_loss, metrics


def pretrain(
    model: LlamaForCausalLM,
    tokenizer,
    samples: Mapping[str, Sequence[Sample]],
    settings: PretrainSettings,
    mesh: Mesh,
    *,
    readout: Readout | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Trains every weight of `model` (a base without adapters) in place on `samples`: the LM loss
    on the responses and, with `readout`, the keyword readout from step `settings.readout_start`.
    Returns the metrics of every step."""
    from tqdm import tqdm  # noqa: PLC0415

    data = DataConfig(
        seq_len=settings.seq_len, batch_size=settings.batch_size, lm_loss="response", seed=settings.seed
    )
    shape = (settings.batch_size, settings.seq_len)

    @nnx.jit
    def step(model, optimizer, batch, weight):
        def loss_fn(model):
            out = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])
            return pretraining_objective(out.logits, batch, readout, weight)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return metrics

    history = []
    batches = train_batches({name: tuple(group) for name, group in samples.items()}, tokenizer, data)
    try:
        with jax.set_mesh(mesh):
            weights = nnx.state(model, nnx.Param)
            nnx.update(model, jax.device_put(weights, shardings_of(weights, mesh)))
            optimizer = nnx.Optimizer(model, optimizer_transform(settings.train_config()), wrt=nnx.Param)
            sharding = batch_sharding(mesh, shape)
            for i in tqdm(range(settings.steps), desc="pre-train base", unit="step", disable=not progress):
                local = next(batches)
                batch = {k: jax.device_put(np.asarray(local[k]), sharding) for k in BATCH_KEYS}
                weight = settings.readout_weight if i >= settings.readout_start else 0.0
                metrics = {k: float(v) for k, v in step(model, optimizer, batch, jnp.float32(weight)).items()}
                history.append(metrics)
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingError(f"pre-training step {i + 1}: the loss is not finite ({metrics})")
    finally:
        batches.close()
    return history
