"""What trains and how: the variable kinds the optimizer updates, AdamW with warmup + cosine.

A training run splits the NNX model once (`nnx.split`) into a graph definition, the trainable
state (`GateParam` and / or `nnx.LoRAParam`, as `TrainConfig` says) and the frozen rest; the
`nnx.Optimizer` holds AdamW moments for the trainable kinds only. The jitted step then works on
these pure pytrees, so the hot loop pays no Python graph walk and the frozen weights get no
gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.modeling.meteora_linear import GateParam
from meteora_jax.sharding import variable_sharding
from meteora_jax.training.train_config import TrainConfig


def trainable_kinds(config: TrainConfig):
    """The NNX filter of the variables a run updates: gates, adapters, or both."""
    chosen = ((GateParam, config.train_gates), (nnx.LoRAParam, config.train_adapters))
    kinds = [kind for kind, on in chosen if on]
    return kinds[0] if len(kinds) == 1 else nnx.Any(*kinds)


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to 0 at `config.horizon`
    (held at 0 after it). A warmup as long as the horizon is cut to leave one cosine step (optax
    needs one), so `--warmup-steps` >= `--steps` still trains."""
    warmup = min(config.warmup_steps, config.horizon - 1)
    return optax.schedules.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=config.horizon, end_value=0.0
    )


def optimizer_transform(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless `clip_norm` is 0), then AdamW on the schedule.

    Clipping off is an identity in the same chain, so the optimizer state has one structure
    whatever `clip_norm` is and a run resumes under another value."""
    adamw = optax.adamw(learning_rate(config), b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)
    clip = optax.identity() if config.clip_norm == 0 else optax.clip_by_global_norm(config.clip_norm)
    return optax.chain(clip, adamw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The part of a run that changes every step (donated to the step): trainable variables and
    the optimizer's state (its step count and AdamW moments)."""

    params: nnx.State
    opt: nnx.State

    @property
    def step(self) -> jax.Array:
        """Optimizer steps taken (uint32 scalar)."""
        return self.opt["step"][...]


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """The static halves of the split: graph definitions and the trainable filter."""

    module_def: nnx.GraphDef
    optimizer_def: nnx.GraphDef
    trainable: object  # the NNX filter of trainable variables

    def module(self, params: nnx.State, frozen: nnx.State) -> LlamaForCausalLM:
        return nnx.merge(self.module_def, params, frozen)

    def optimizer(self, opt: nnx.State) -> nnx.Optimizer:
        return nnx.merge(self.optimizer_def, opt)


def _cast_frozen(module: LlamaForCausalLM, trainable, dtype) -> None:
    """Stores the frozen floating-point weights in `dtype`; the trainable variables keep their
    (float32) storage."""
    frozen = nnx.state(module, nnx.All(nnx.Param, nnx.Not(trainable)))
    cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, frozen)
    nnx.update(module, cast)


def split_for_training(
    module: LlamaForCausalLM, config: TrainConfig, trainable=None
) -> tuple[TrainParts, TrainState, nnx.State]:
    """(static parts, trainable state with fresh optimizer moments, frozen state) of `module`.

    `trainable`: the NNX filter of what trains (default: `trainable_kinds(config)`).

    Sets the module's training settings (`remat`, `gate_loss_grad`, `routing_noise`); with a
    bfloat16 compute dtype the frozen weights are stored in it (half the memory and no per-step
    cast). The training runs and `meteora-jax compile` both split here, so what compiles
    for a pod is what trains."""
    kinds = trainable_kinds(config) if trainable is None else trainable
    module.configure_training(
        remat=config.remat, gate_loss_grad=config.gate_loss_grad, routing_noise=config.routing_noise
    )
    if config.dtype != "float32":
        _cast_frozen(module, kinds, jnp.dtype(config.dtype))
    optimizer = nnx.Optimizer(module, optimizer_transform(config), wrt=kinds)
    module_def, params, frozen = nnx.split(module, kinds, ...)
    optimizer_def, opt = nnx.split(optimizer)
    return TrainParts(module_def, optimizer_def, kinds), TrainState(params, opt), frozen


def shardings_of(tree, mesh: Mesh):
    """The NamedSharding of every variable of an NNX state by its `logical_axes` (replicated
    without), with the same tree structure, for `jax.jit` in/out shardings."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(variable_sharding(leaf, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
