"""The MeteoRA linear layer: a frozen base projection plus L LoRA experts chosen per token.

Dimensions: B batch, T tokens, M = B*T, D in, O out, L adapters, R rank (padded), k chosen.

Three variable kinds let optimizers pick what trains: base weights are `nnx.Param`, the
gates `GateParam` (trained by default), the stacked adapters `nnx.LoRAParam` (optionally
trained), and the per-adapter scales `AdapterScale` (fixed, never a parameter).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from meteora_jax.config import PROJECTIONS, MoELoRAConfig
from meteora_jax.ops.moe_lora import moe_lora
from meteora_jax.ops.routing import Routing, RoutingSettings, gate_logits


class GateParam(nnx.Param):
    """A MeteoRA gate kernel (D, L)."""


class AdapterScale(nnx.Variable):
    """Per-adapter LoRA scale (alpha / r, or alpha / sqrt(r)); zero where an adapter is absent."""


# Filters by variable kind: the frozen base model, and what gate training updates.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.Any(GateParam, nnx.LoRAParam)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GateStats:
    """One projection's gate against the task labels, summed over the labelled tokens (float32):
    cross-entropy of the raw gate logits, top-1 hits, and how many tokens were labelled."""

    ce_sum: jax.Array
    correct: jax.Array
    count: jax.Array


def gate_stats(logits_ml: jax.Array, labels_m: jax.Array) -> GateStats:
    """GateStats of gate logits (M, L) against labels (M,) int32, -1 = unlabelled (padding).

    The MeteoRA gate term pairs the gate logits at token t with the task label of token t (the
    reference shifted them like the LM loss, pairing t with t + 1; docs/method.md).
    """
    logits_ml = logits_ml.astype(jnp.float32)
    labelled_m = labels_m >= 0
    target_m = jnp.maximum(labels_m, 0)
    picked_m = jnp.take_along_axis(logits_ml, target_m[:, None], axis=-1)[:, 0]
    ce_m = jax.nn.logsumexp(logits_ml, axis=-1) - picked_m
    hit_m = jnp.argmax(logits_ml, axis=-1) == target_m
    return GateStats(
        ce_sum=jnp.sum(jnp.where(labelled_m, ce_m, 0.0)),
        correct=jnp.sum(labelled_m & hit_m, dtype=jnp.float32),
        count=jnp.sum(labelled_m, dtype=jnp.float32),
    )


NO_ROUTING_NOISE = 0.0  # the reference's choice: the top-k of the clean logits


@dataclasses.dataclass
class ForwardContext:
    """Per-call state threaded through one decoder layer: routing settings, the training key
    (LoRA dropout; with `routing_noise` > 0, Gumbel noise of that scale on the gate logits when
    the top-k is chosen) and the gate labels (M,) of training (with `detach_gate_input`, the gate
    loss sees each gate's input as a constant); collects each projection's routing and gate
    statistics."""

    settings: RoutingSettings | None = None
    dropout_key: jax.Array | None = None
    gate_labels_m: jax.Array | None = None
    detach_gate_input: bool = True
    routing_noise: float = NO_ROUTING_NOISE
    routes: dict[str, Routing] = dataclasses.field(default_factory=dict)
    gate_stats: dict[str, GateStats] = dataclasses.field(default_factory=dict)


class MoELoRALinear(nnx.Module):
    """y = x @ W + sum over the top-k adapters of w_j * s_j * (x @ A_j) @ B_j (docs/method.md)."""

    def __init__(
        self,
        name: str,
        d_in: int,
        d_out: int,
        axes: tuple[str, str],
        moe: MoELoRAConfig,
        *,
        dtype,
        param_dtype,
        backend: str,
        rngs: nnx.Rngs,
    ):
        in_axis, out_axis = axes
        n_adapters, rank = moe.num_adapters, moe.rank
        normal = nnx.initializers.normal
        self.kernel = nnx.Param(normal(0.02)(rngs.params(), (d_in, d_out), param_dtype), logical_axes=axes)
        self.gate = GateParam(
            normal(1 / math.sqrt(d_in))(rngs.params(), (d_in, n_adapters), param_dtype),
            logical_axes=(in_axis, "adapters"),
        )
        self.lora_a = nnx.LoRAParam(
            normal(1 / math.sqrt(d_in))(rngs.params(), (n_adapters, d_in, rank), param_dtype),
            logical_axes=("adapters", in_axis, "lora_rank"),
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((n_adapters, rank, d_out), param_dtype),
            logical_axes=("adapters", "lora_rank", out_axis),
        )
        self.scale = AdapterScale(jnp.ones((n_adapters,), jnp.float32), logical_axes=("adapters",))
        self.index = PROJECTIONS.index(name)
        self.dropout = moe.dropout
        self.backend = backend
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext) -> tuple[jax.Array, Routing, GateStats | None]:
        """Returns y (B, T, O), this projection's Routing (B, T, ...) and, when `ctx` carries gate
        labels, its GateStats (computed here, per layer, so no (layers x tokens x L) tensor of
        gate logits is ever kept)."""
        b, t, d = x_btd.shape
        settings = ctx.settings.per_token(t)
        if ctx.gate_labels_m is not None and not ctx.detach_gate_input and not settings.return_logits:
            settings = dataclasses.replace(settings, return_logits=True)
        x_md = x_btd.reshape(b * t, d).astype(self.dtype)
        lora_x = None
        if ctx.dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(
                jax.random.fold_in(ctx.dropout_key, self.index), 1 - self.dropout, x_md.shape
            )
            lora_x = jnp.where(keep, x_md / (1 - self.dropout), 0).astype(self.dtype)
        noise = None
        if ctx.dropout_key is not None and ctx.routing_noise > 0 and settings.forced_ids is None:
            key = jax.random.fold_in(ctx.dropout_key, len(PROJECTIONS) + self.index)  # not dropout's
            noise = ctx.routing_noise * jax.random.gumbel(key, (b * t, self.gate.shape[1]), jnp.float32)
        y_mo, routing = moe_lora(
            x_md,
            self.kernel[...],
            self.gate[...],
            self.lora_a[...],
            self.lora_b[...],
            self.scale[...],
            settings,
            backend=self.backend,
            lora_x_md=lora_x,
            forced_m=settings.forced_ids,
            choice_noise_ml=noise,
        )
        stats = None
        if ctx.gate_labels_m is not None:
            logits_ml = routing.logits
            if ctx.detach_gate_input:  # the same values; the gradient reaches this gate only
                logits_ml = gate_logits(jax.lax.stop_gradient(x_md), self.gate[...])
            stats = gate_stats(logits_ml, ctx.gate_labels_m)
            if not ctx.settings.return_logits:
                routing = dataclasses.replace(routing, logits=None)
        routing = jax.tree.map(lambda a: a.reshape(b, t, a.shape[-1]), routing)
        return y_mo.reshape(b, t, -1), routing, stats


def project(layer: nnx.Module, name: str, x_btd: jax.Array, ctx: ForwardContext) -> jax.Array:
    """Applies a projection, plain or MeteoRA; the latter records its routing (and gate
    statistics, in training) in `ctx`."""
    if isinstance(layer, MoELoRALinear):
        y, ctx.routes[name], stats = layer(x_btd, ctx)
        if stats is not None:
            ctx.gate_stats[name] = stats
        return y
    return layer(x_btd)
