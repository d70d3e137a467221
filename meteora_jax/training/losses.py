"""The MeteoRA training objective: LM cross-entropy + lambda * gate cross-entropy, in float32.

Dimensions: B rows, S slots, V vocab, Y decoder layers, P targeted projections.

The gate term pools the raw gate logits of every targeted projection of every layer at every
labelled token into one mean (the reference's objective). The model computes it inside the
layer scan (`CausalLMOutput.gate_stats`: per projection, (Y,) sums), so no (Y x P x tokens x L)
tensor of gate logits exists. Every term is a sum here, divided by the step's GLOBAL count
(`Denominators`), so micro-batches of one step add up to exactly the full-batch loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from meteora_jax.modeling.llama import CausalLMOutput
from meteora_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossSums:
    """Sums over the tokens of a batch (or micro-batch), float32 scalars."""

    lm_ce: jax.Array  # LM cross-entropy, weighted by lm_weights
    lm_count: jax.Array  # sum of lm_weights
    gate_ce: jax.Array  # gate cross-entropy over every (layer, projection, labelled token)
    gate_correct: jax.Array  # of those, top-1 hits
    gate_count: jax.Array  # (layer, projection, labelled token) triples

    def __add__(self, other: LossSums) -> LossSums:
        return jax.tree.map(jnp.add, self, other)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Denominators:
    """The step's global counts (all micro-batches, all hosts), >= 1 so an empty term is 0."""

    lm: jax.Array
    gate: jax.Array


def denominators(batch: dict, num_layers: int, num_projections: int) -> Denominators:
    """Denominators of a whole step's batch (B, S): LM weights, and labelled tokens x Y x P."""
    lm = jnp.sum(batch["lm_weights"].astype(jnp.float32))
    labelled = jnp.sum(batch["gate_labels"] >= 0, dtype=jnp.float32)
    return Denominators(
        lm=jnp.maximum(lm, 1.0), gate=jnp.maximum(labelled * num_layers * num_projections, 1.0)
    )


def lm_sums(
    logits_bsv: jax.Array, targets_bs: jax.Array, weights_bs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(weighted CE sum, weight sum) of next-token predictions, in float32."""
    ce_bs = optax.softmax_cross_entropy_with_integer_labels(logits_bsv.astype(jnp.float32), targets_bs)
    weights_bs = weights_bs.astype(jnp.float32)
    return jnp.sum(ce_bs * weights_bs), jnp.sum(weights_bs)


def chunked_lm_sums(
    hidden_bsd: jax.Array, kernel_dv: jax.Array, targets_bs: jax.Array, weights_bs: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """`lm_sums` of the logits `hidden_bsd @ kernel_dv`, never held whole: the slots are taken
    `chunk` at a time along S (every row in each, so a sharded batch stays sharded), and each
    chunk's (B, chunk, V) float32 logits are recomputed in the backward pass instead of stored."""
    b, s, _ = hidden_bsd.shape
    chunk = min(chunk, s)
    n = -(-s // chunk)
    pad = n * chunk - s  # padded slots carry weight 0

    def split(x):  # (B, S, ...) -> (n, B, chunk, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one_chunk(carry, xs):
        h_bcd, t_bc, w_bc = xs
        logits_bcv = constrain(jnp.dot(h_bcd, kernel_dv), ("batch", "length", "vocab"))
        ce, count = lm_sums(logits_bcv, t_bc, w_bc)
        return (carry[0] + ce, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (ce, count), _ = jax.lax.scan(
        one_chunk, (zero, zero), (split(hidden_bsd), split(targets_bs), split(weights_bs))
    )
    return ce, count


def loss_sums(
    output: CausalLMOutput, batch: dict, kernel_dv: jax.Array | None = None, chunk: int = 0
) -> LossSums:
    """The sums of one forward pass; the gate terms are 0 when it ran without `gate_labels`
    (`output.gate_stats` None: no gate loss). An output without logits (the head skipped) takes
    its LM term from `output.hidden` and the head `kernel_dv`, `chunk` slots at a time."""
    if output.logits is None:
        lm_ce, lm_count = chunked_lm_sums(
            output.hidden, kernel_dv, batch["lm_targets"], batch["lm_weights"], chunk
        )
    else:
        lm_ce, lm_count = lm_sums(output.logits, batch["lm_targets"], batch["lm_weights"])
    stats = list((output.gate_stats or {}).values())
    zero = jnp.zeros((), jnp.float32)
    return LossSums(
        lm_ce=lm_ce,
        lm_count=lm_count,
        gate_ce=sum((jnp.sum(s.ce_sum) for s in stats), zero),
        gate_correct=sum((jnp.sum(s.correct) for s in stats), zero),
        gate_count=sum((jnp.sum(s.count) for s in stats), zero),
    )


def objective(sums: LossSums, den: Denominators, gate_loss_weight: float) -> jax.Array:
    """This (micro-)batch's share of the step loss: lm_ce / N_lm + lambda * gate_ce / N_gate."""
    return sums.lm_ce / den.lm + gate_loss_weight * sums.gate_ce / den.gate
