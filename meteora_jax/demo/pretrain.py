"""The demo base learns the prompt format: a short full-model LM pre-training on copy samples
(`[INST] copy: abcd [/INST]` -> `abcd`) and composite prompts of copy questions (answered as
numbered lines), so it answers in both formats yet cannot do the tasks.

It runs the training engine's own pieces (the Grain pipeline with packing, the sharded jitted
step, AdamW with warmup + cosine) with every `nnx.Param` of a plain base trainable; nothing is
checkpointed (the demo caches the finished base instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meteora_jax.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from meteora_jax.data.tasks import Sample
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.training.config import TrainConfig
from meteora_jax.training.loop import TrainingError
from meteora_jax.training.state import split_for_training
from meteora_jax.training.step import batch_sharding, make_train_step


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Steps, rows x slots per step and the peak learning rate of the pre-training."""

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 48
    lr: float = 3e-3
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, lr=self.lr, warmup_steps=min(20, self.steps), clip_norm=1.0,
            gate_loss_weight=0.0, seed=self.seed,
        )  # fmt: skip


def pretrain(
    model: LlamaForCausalLM,
    tokenizer,
    samples: Mapping[str, Sequence[Sample]],
    settings: PretrainSettings,
    mesh: Mesh,
    *,
    progress: bool = True,
) -> list[float]:
    """Trains every weight of `model` (a base without adapters) in place on `samples` with the LM
    loss on the responses; returns the loss of every step."""
    from tqdm import tqdm  # noqa: PLC0415

    cfg = settings.train_config()
    data = DataConfig(
        seq_len=settings.seq_len, batch_size=settings.batch_size, lm_loss="response", seed=settings.seed
    )
    shape = (settings.batch_size, settings.seq_len)
    losses = []
    batches = train_batches({name: tuple(group) for name, group in samples.items()}, tokenizer, data)
    try:
        with jax.set_mesh(mesh):
            parts, state, frozen = split_for_training(model, cfg, kinds=nnx.Param)
            step = make_train_step(parts, cfg, state, frozen, mesh, batch_shape=shape)
            state = jax.device_put(state, step.state_shardings)
            frozen = jax.device_put(frozen, step.frozen_shardings)
            sharding = batch_sharding(mesh, shape)
            key = jax.random.key(settings.seed)
            for _ in tqdm(range(settings.steps), desc="pre-train base", unit="step", disable=not progress):
                local = next(batches)
                batch = {k: jax.device_put(np.asarray(local[k]), sharding) for k in BATCH_KEYS}
                state, metrics = step(frozen, state, batch, key)
                losses.append(float(metrics["lm_loss"]))
                if not math.isfinite(losses[-1]):
                    raise TrainingError(
                        f"pre-training step {len(losses)}: the loss is not finite ({losses[-1]})"
                    )
        nnx.update(model, state.params)
    finally:
        batches.close()
    return losses
