"""The MeteoRA gate: logits over adapters, top-k choice, softmax weights over the chosen k.

Dimensions: M tokens (any leading shape), D input features, L adapters, k chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """Run-time routing knobs. `top_k` is static (it shapes arrays); `temperature` is traced,
    so changing it never recompiles. `return_logits` keeps the raw gate logits (training).
    `forced_ids` pins each batch row to one adapter (weight 1), like PEFT's `adapter_names`.
    Per-row settings (a server's rows are different requests): `temperature` of shape (B,),
    `row_top_k` (B,), each row's own k <= `top_k` (its weights over its k best adapters), and
    `gated_rows` (B,) bool, the rows that follow their gates while the others are forced."""

    temperature: jax.Array  # () or (B,) float32
    top_k: int = dataclasses.field(metadata=dict(static=True), default=2)
    return_logits: bool = dataclasses.field(metadata=dict(static=True), default=False)
    forced_ids: jax.Array | None = None  # (B,) int32: one adapter per row, bypassing the gate; -1 = none
    row_top_k: jax.Array | None = None  # (B,) int32 in [1, top_k]
    gated_rows: jax.Array | None = None  # (B,) bool, with forced_ids

    def per_token(self, tokens_per_row: int) -> RoutingSettings:
        """The per-row settings repeated for each of a row's tokens: (B,) -> (B * T,) (as the
        layers flatten tokens); scalar settings as they are."""
        rows = lambda a: None if a is None or a.ndim == 0 else jnp.repeat(a, tokens_per_row)  # noqa: E731
        temperature = self.temperature if self.temperature.ndim == 0 else rows(self.temperature)
        return dataclasses.replace(
            self, temperature=temperature, forced_ids=rows(self.forced_ids), row_top_k=rows(self.row_top_k),
            gated_rows=rows(self.gated_rows),
        )  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Per-token routing of one projection: ids (..., k) int32, weights (..., k), logits (..., L)."""

    ids: jax.Array
    weights: jax.Array
    logits: jax.Array | None = None


def gate_logits(x_md: jax.Array, gate_dl: jax.Array) -> jax.Array:
    """z = x @ G in float32: top-k on bfloat16 logits would flip near-ties."""
    return jnp.dot(x_md.astype(jnp.float32), gate_dl.astype(jnp.float32))


def tempered_softmax(top_z: jax.Array, temperature: jax.Array) -> jax.Array:
    """softmax(top_z / T) over the last axis, stable for any T > 0 (top_z in any order).

    The max is subtracted before dividing by T, and T is kept at least float32's smallest normal
    number (a denormal T such as 1e-45 may be flushed to 0, and 0 / 0 is NaN), so a tiny T gives
    one-hot weights (shared among exact ties) and a huge T uniform ones, never NaN. The max is
    taken by a reduction, not as the first column: the same value, but XLA CPU runs the column
    slice as a separate pass that cost ~30 us per projection at decode (half the routing time).
    """
    shifted = top_z - jnp.max(top_z, axis=-1, keepdims=True)
    return jax.nn.softmax(shifted / jnp.maximum(temperature, jnp.finfo(top_z.dtype).tiny), axis=-1)


def route(
    x_md: jax.Array,
    gate_dl: jax.Array,
    settings: RoutingSettings,
    forced_m: jax.Array | None = None,
    gated_m: jax.Array | None = None,
    choice_noise_ml: jax.Array | None = None,
) -> Routing:
    """Chooses top-k adapters per token; weights = softmax(z[ids] / T) (k == 1 gives 1).

    forced_m: (M,) adapter id per token overriding the gate (k = 1, weight 1; -1: weight 0).
    gated_m: (M,) bool, the tokens that follow the gate despite `forced_m` (k columns, a forced
    token's weight in the first). Per-token settings (`RoutingSettings.per_token`): a
    temperature (M,) and `row_top_k` (M,), whose columns past a token's own k get weight 0.
    choice_noise_ml: (M, L) added to the logits for the choice of the top-k only (training's
    Gumbel top-k); the weights stay the softmax of the chosen adapters' own logits.
    """
    z_ml = gate_logits(x_md, gate_dl)
    if forced_m is not None:
        forced_ids = jnp.maximum(forced_m, 0).astype(jnp.int32)[:, None]
        forced_weights = (forced_m >= 0).astype(jnp.float32)[:, None]
        if gated_m is None:
            return Routing(
                ids=forced_ids, weights=forced_weights, logits=z_ml if settings.return_logits else None
            )
        gated = route(x_md, gate_dl, dataclasses.replace(settings, return_logits=False))
        pad = lambda a: jnp.pad(a, ((0, 0), (0, settings.top_k - 1)))  # noqa: E731
        return Routing(
            ids=jnp.where(gated_m[:, None], gated.ids, pad(forced_ids)),
            weights=jnp.where(gated_m[:, None], gated.weights, pad(forced_weights)),
            logits=z_ml if settings.return_logits else None,
        )
    if choice_noise_ml is None:
        top_z, ids = jax.lax.top_k(z_ml, settings.top_k)
    else:
        _, ids = jax.lax.top_k(z_ml + choice_noise_ml, settings.top_k)
        top_z = jnp.take_along_axis(z_ml, ids, axis=-1)
    temperature = settings.temperature
    if temperature.ndim == 1:
        temperature = temperature[:, None]
    if settings.row_top_k is not None:
        kept = jnp.arange(settings.top_k)[None, :] < settings.row_top_k[:, None]
        top_z = jnp.where(kept, top_z, -jnp.inf)
    weights = tempered_softmax(top_z, temperature)
    return Routing(
        ids=ids.astype(jnp.int32), weights=weights, logits=z_ml if settings.return_logits else None
    )
