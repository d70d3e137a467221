"""One jitted training step: micro-batches, gradients of the trainable state, the optimizer update.

Dimensions: B rows of the global batch, A micro-batches (`grad_accum`), S slots.

The step is one `jax.jit` program with explicit in / out shardings (parameters and optimizer
state by the logical rules, batches split over `data` x `fsdp`) and the train state donated,
so its buffers are updated in place. Micro-batch a takes rows a, a + A, a + 2A, ...: each
device keeps its own rows, nothing moves between devices to cut the batch. Every loss term is
divided by the whole step's count (`losses.Denominators`), so A micro-batches give the same
gradients as one batch of B rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from meteora_jax.config import MoELoRAConfig
from meteora_jax.data.pipeline import BATCH_KEYS
from meteora_jax.ops.routing import RoutingSettings
from meteora_jax.sharding import constrain, logical_to_spec
from meteora_jax.training.losses import Denominators, LossSums, denominators, loss_sums, objective
from meteora_jax.training.state import TrainParts, TrainState, learning_rate, shardings_of
from meteora_jax.training.train_config import TrainConfig

METRICS = ("loss", "lm_loss", "gate_loss", "gate_accuracy", "grad_norm", "lr", "lm_tokens", "gate_tokens")


def batch_sharding(mesh: Mesh, shape: tuple[int, int]) -> NamedSharding:
    """The sharding of one (B, S) batch array: rows over `data` x `fsdp`."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), shape, mesh))


def _micro_batches(batch: dict, num_micro: int) -> dict:
    """(B, S) arrays -> (A, B / A, S), micro-batch a holding rows a, a + A, ... (no data movement)."""

    def split(x_bs):
        b, s = x_bs.shape
        x_kas = x_bs.reshape(b // num_micro, num_micro, s)
        return constrain(jnp.swapaxes(x_kas, 0, 1), (None, "batch", "length"))

    return {k: split(batch[k]) for k in BATCH_KEYS}


def _zero_sums() -> LossSums:
    zero = jnp.zeros((), jnp.float32)
    return LossSums(zero, zero, zero, zero, zero)


@dataclasses.dataclass(frozen=True)
class StepFunction:
    """The compiled step and what it was built for. Call as `step(frozen, state, batch, key)`:
    returns (new state, metrics {name: float32 scalar}); `state` is donated."""

    fn: Callable
    state_shardings: object
    frozen_shardings: object
    mesh: Mesh

    def __call__(self, frozen, state: TrainState, batch: dict, key: jax.Array):
        return self.fn(frozen, state, batch, key)


def make_gradients(
    parts: TrainParts, config: TrainConfig, *, temperature: float = MoELoRAConfig.temperature
) -> Callable:
    """`gradients(params, frozen, batch, key) -> (grads, LossSums, Denominators)` of one step's
    global batch, over `config.grad_accum` micro-batches (traceable; `make_train_step` jits it)."""
    num_micro = config.grad_accum
    with_gate_term = config.gate_loss_weight > 0  # at 0 the layers skip the gate statistics

    def micro_loss(params, frozen, micro: dict, den: Denominators, key: jax.Array):
        routing = RoutingSettings(jnp.float32(temperature), top_k=config.top_k)  # traced: no device array
        module = parts.module(params, frozen)
        out = module(
            micro["input_ids"],
            positions=micro["positions"],
            segment_ids=micro["segment_ids"],
            gate_labels=micro["gate_labels"] if with_gate_term else None,
            routing=routing,
            dropout_rng=key,
            head=config.loss_chunk == 0,
        )
        sums = loss_sums(out, micro, module.head_kernel(), config.loss_chunk)
        return objective(sums, den, config.gate_loss_weight), sums

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def gradients(params, frozen, batch: dict, key: jax.Array):
        module = parts.module(params, frozen)
        projections = 0 if module.moe is None else len(module.moe.targets)
        den = denominators(batch, module.config.num_hidden_layers, projections)
        if num_micro == 1:
            grads, sums = grad_fn(params, frozen, batch, den, key)
            return grads, sums, den
        micro = _micro_batches(batch, num_micro)
        keys = jax.random.split(key, num_micro)

        def accumulate(carry, xs):
            grads_acc, sums_acc = carry
            grads, sums = grad_fn(params, frozen, xs[0], den, xs[1])
            return (jax.tree.map(jnp.add, grads_acc, grads), sums_acc + sums), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, _zero_sums()), (micro, keys))
        return grads, sums, den

    return gradients


def make_train_step(
    parts: TrainParts,
    config: TrainConfig,
    state: TrainState,
    frozen,
    mesh: Mesh,
    *,
    batch_shape: tuple[int, int],
    temperature: float = MoELoRAConfig.temperature,
) -> StepFunction:
    """Builds the jitted step for a run over `mesh` with global batches of `batch_shape` (B, S).

    The dropout key of step n is `fold_in(key, n)`, so a resumed run draws what an uninterrupted
    one would."""
    schedule = learning_rate(config)
    gradients = make_gradients(parts, config, temperature=temperature)

    def step(frozen, state: TrainState, batch: dict, key: jax.Array):
        grads, sums, den = gradients(state.params, frozen, batch, jax.random.fold_in(key, state.step))
        grad_norm = optax.tree.norm(grads)
        module = parts.module(state.params, frozen)
        optimizer = parts.optimizer(state.opt)
        lr = schedule(optimizer.step[...])
        optimizer.update(module, grads)
        new_state = TrainState(nnx.state(module, parts.trainable), nnx.state(optimizer))
        lm_loss, gate_loss = sums.lm_ce / den.lm, sums.gate_ce / den.gate
        metrics = {
            "loss": lm_loss + config.gate_loss_weight * gate_loss,
            "lm_loss": lm_loss,
            "gate_loss": gate_loss,
            "gate_accuracy": sums.gate_correct / den.gate,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "lm_tokens": sums.lm_count,
            "gate_tokens": sums.gate_count,
        }
        return new_state, metrics

    state_shardings = shardings_of(state, mesh)
    frozen_shardings = shardings_of(frozen, mesh)
    data_sharding = {k: batch_sharding(mesh, batch_shape) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(
        step,
        in_shardings=(frozen_shardings, state_shardings, data_sharding, replicated),
        out_shardings=(state_shardings, {k: replicated for k in METRICS}),
        donate_argnums=(1,),
    )
    return StepFunction(fn, state_shardings, frozen_shardings, mesh)
