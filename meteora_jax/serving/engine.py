"""Continuous batching: a fixed number of decode slots over one KV cache, fed by a thread.

Dimensions: B slots, C cache slots per row, P a prompt bucket, V vocab,
L adapters, Y layers.

Rows share the cache's write position (`KVCache.index`), as in `generate`; what makes them
independent requests is each row's `valid` mask: a token's RoPE position is the count of valid
slots before it, so a row may start anywhere. Three compiled programs serve all traffic:

- `admit` (one per prompt bucket): prefills one prompt into a fresh one-row cache, copies it into
  its row at slots [index - P, index), resets the row's sampling and routing settings and draws
  its first token;
- `decode` (one): feeds every row's last token at `index` and draws the next one per row (each
  row its own temperature, top-p, seed and routing);
- `compact` (one): when `index` reaches C, shifts every row left by `max_length`; a live request
  holds at most `max_length` slots, so it loses none.

C is the largest prompt bucket (at least `max_length`) plus `max_length`: `index` never falls
below the largest bucket, so any prompt fits before it, and a compaction comes every
`max_length` steps.

Each draw also returns the routing that wrote the token: the adapters' weights averaged over all
layers and projections (L,). Programs are compiled by `warm_up` and never by traffic.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.generation import prompt_bucket, top_p_filter
from meteora_jax.modeling.llama import KVCache
from meteora_jax.ops.routing import RoutingSettings

GATES = -2  # a row's forced adapter when the gates route it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """Every slot's decoding state, one row per slot; lives on the device between programs."""

    cache: KVCache  # (Y, B, C, K, H), valid (B, C), one shared index
    last_b: jax.Array  # (B,) int32: the token to feed next
    step_b: jax.Array  # (B,) int32: tokens drawn so far (the sampling key's counter)
    temperature_b: jax.Array  # (B,) float32, 0: greedy
    top_p_b: jax.Array  # (B,) float32
    seed_b: jax.Array  # (B,) uint32
    forced_b: jax.Array  # (B,) int32: adapter forced on the row, -1: none, GATES: the gates
    routing_temperature_b: jax.Array  # (B,) float32
    routing_top_k_b: jax.Array  # (B,) int32


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """One request's sampling and routing, as its row holds them (host values)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    adapter: int = GATES  # an adapter index forced on every token, -1: none (the base), GATES: the gates
    routing_temperature: float = 1.0
    routing_top_k: int = 1

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Host scalars: a program takes them as they are (no conversion program per value)."""
        return (
            np.float32(self.temperature), np.float32(self.top_p), np.uint32(self.seed),
            np.int32(self.adapter), np.float32(self.routing_temperature), np.int32(self.routing_top_k),
        )  # fmt: skip


def draw(logits_bv, temperature_b, top_p_b, seed_b, step_b) -> jax.Array:
    """(B,) next tokens, each row by its own settings: argmax at temperature 0, else a draw from
    logits / T under the row's top-p, keyed by (seed, step) so a row never depends on others."""

    def one(logits_v, temperature, top_p, seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        scaled = logits_v / jnp.maximum(temperature, 1e-6)
        sampled = jax.random.categorical(key, top_p_filter(scaled[None], top_p)[0])
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits_v)).astype(jnp.int32)

    return jax.vmap(one)(logits_bv.astype(jnp.float32), temperature_b, top_p_b, seed_b, step_b)


def adapter_mix(routing, num_adapters: int, position: int) -> jax.Array:
    """(B, L) each row's routing weights of the token at `position`, averaged over layers and
    projections ((B, 0) for a model without adapters)."""
    if not routing:
        return jnp.zeros((0, 0), jnp.float32)
    mixes = [
        jnp.sum(jax.nn.one_hot(r.ids[:, position], num_adapters) * r.weights[:, position, :, None], axis=1)
        for r in routing.values()
    ]
    return jnp.mean(jnp.stack(mixes), axis=0)


def _routing(module, s: Slots) -> RoutingSettings | None:
    if module.moe is None:
        return None
    return RoutingSettings(
        s.routing_temperature_b, top_k=module.moe.top_k, forced_ids=s.forced_b, row_top_k=s.routing_top_k_b,
        gated_rows=s.forced_b == GATES,
    )  # fmt: skip


def _mix(module, routing, rows: int, position: int) -> jax.Array:
    if module.moe is None:
        return jnp.zeros((rows, 0), jnp.float32)
    return adapter_mix(routing, module.moe.num_adapters, position)


def _set_row(a: jax.Array, slot: jax.Array, value) -> jax.Array:
    return a.at[slot].set(jnp.asarray(value, a.dtype))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("s",))
def admit(
    graphdef, params, s: Slots, ids_1p, mask_1p, slot, row: tuple
) -> tuple[Slots, jax.Array, jax.Array]:
    """Prefills one prompt (left-padded to its bucket P) into row `slot`; returns (slots, first
    token (), its routing (L,))."""
    module = nnx.merge(graphdef, params)
    temperature, top_p, seed, adapter, routing_temperature, routing_top_k = row
    s = dataclasses.replace(
        s,
        temperature_b=_set_row(s.temperature_b, slot, temperature),
        top_p_b=_set_row(s.top_p_b, slot, top_p),
        seed_b=_set_row(s.seed_b, slot, seed),
        forced_b=_set_row(s.forced_b, slot, adapter),
        routing_temperature_b=_set_row(s.routing_temperature_b, slot, routing_temperature),
        routing_top_k_b=_set_row(s.routing_top_k_b, slot, routing_top_k),
    )
    routing = _routing(module, s)
    if routing is not None:
        pick = lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1)  # noqa: E731
        routing = dataclasses.replace(
            routing, temperature=pick(routing.temperature), forced_ids=pick(routing.forced_ids),
            row_top_k=pick(routing.row_top_k), gated_rows=pick(routing.gated_rows),
        )  # fmt: skip
    p = ids_1p.shape[1]
    fresh = KVCache.init(module.config, 1, p, dtype=s.cache.k.dtype)
    out = module(ids_1p, attention_mask=mask_1p, cache=fresh, routing=routing, return_routing=True)
    start = s.cache.index - p
    cache = s.cache
    k = jax.lax.dynamic_update_slice(cache.k, out.cache.k, (0, slot, start, 0, 0))
    v = jax.lax.dynamic_update_slice(cache.v, out.cache.v, (0, slot, start, 0, 0))
    valid_c = jax.lax.dynamic_update_slice(
        jnp.zeros(cache.valid.shape[1], bool), mask_1p[0].astype(bool), (start,)
    )
    valid = cache.valid.at[slot].set(valid_c)
    token = draw(out.logits[:, -1], temperature[None], top_p[None], jnp.asarray(seed, jnp.uint32)[None],
                 jnp.zeros((1,), jnp.int32))[0]  # fmt: skip
    s = dataclasses.replace(
        s,
        cache=dataclasses.replace(cache, k=k, v=v, valid=valid),
        last_b=_set_row(s.last_b, slot, token),
        step_b=_set_row(s.step_b, slot, 1),
    )
    return s, token, _mix(module, out.routing, 1, p - 1)[0]


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("s",))
def decode(graphdef, params, s: Slots) -> tuple[Slots, jax.Array, jax.Array]:
    """One step for every row: feeds its last token, draws the next; returns (slots, tokens (B,),
    their routing (B, L)). Free rows decode too (their results are dropped)."""
    module = nnx.merge(graphdef, params)
    routing = _routing(module, s)
    out = module(s.last_b[:, None], cache=s.cache, routing=routing, return_routing=True)
    tokens = draw(out.logits[:, -1], s.temperature_b, s.top_p_b, s.seed_b, s.step_b)
    s = dataclasses.replace(s, cache=out.cache, last_b=tokens, step_b=s.step_b + 1)
    return s, tokens, _mix(module, out.routing, tokens.shape[0], 0)


@partial(jax.jit, static_argnames=("shift",), donate_argnames=("s",))
def compact(s: Slots, shift: int) -> Slots:
    """Moves every row `shift` slots to the left (the oldest `shift` slots are dropped)."""
    c = s.cache
    roll = lambda a, axis: jnp.roll(a, -shift, axis=axis)  # noqa: E731
    valid = roll(c.valid, 1).at[:, c.valid.shape[1] - shift :].set(False)
    cache = dataclasses.replace(c, k=roll(c.k, 2), v=roll(c.v, 2), valid=valid, index=c.index - shift)
    return dataclasses.replace(s, cache=cache)


@dataclasses.dataclass
class Request:
    """One generation: prompt ids, at most `max_tokens` new ones, stopping at `eos_ids`. The
    engine calls `emit(token, mix)` per token from its thread and `finish(reason)` once
    ("eos", "length", "cancelled", or an error's text)."""

    ids: list[int]
    max_tokens: int
    row: RowSettings
    eos_ids: tuple[int, ...]
    emit: Callable[[int, np.ndarray], bool]  # returns False to stop (a stop string, a gone client)
    finish: Callable[[str], None]
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    produced: int = 0  # tokens emitted so far


@dataclasses.dataclass
class EngineStats:
    """Counters for /metrics (written by the engine thread, read by the server)."""

    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    compactions: int = 0
    first_token_seconds: float = 0.0  # sum over requests
    first_tokens: int = 0
    busy_seconds: float = 0.0  # time spent in programs


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


class Engine:
    """Runs requests on `slots` rows of one model in a background thread (`start` / `stop`)."""

    def __init__(self, model, *, slots: int, max_length: int, max_queue: int, pad_id: int = 0):
        self.model = model
        self.slots = slots
        self.max_length = max_length
        self.pad_id = pad_id
        self.graphdef, self.params = nnx.split(model.module)
        self.buckets = sorted({prompt_bucket(n) for n in range(1, max_length)})
        self.floor = max(self.buckets[-1], max_length)  # `index` after a compaction
        self.capacity = self.floor + max_length
        model.check_cache_fits(slots, self.capacity, f"serve (--slots {slots}, --max-length {max_length})")
        self.index = self.floor  # the cache's write position, mirrored on the host
        self.stats = EngineStats()
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.active: dict[int, Request] = {}
        self.state = self._empty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _empty(self) -> Slots:
        b = self.slots
        cache = KVCache.init(self.model.config, b, self.capacity, dtype=self.model.module.dtype)
        cache = dataclasses.replace(cache, index=jnp.int32(self.floor))
        zeros = lambda dtype: jnp.zeros((b,), dtype)  # noqa: E731
        slots = Slots(
            cache=cache, last_b=zeros(jnp.int32), step_b=zeros(jnp.int32), temperature_b=zeros(jnp.float32),
            top_p_b=jnp.ones((b,), jnp.float32), seed_b=zeros(jnp.uint32),
            forced_b=jnp.full((b,), GATES, jnp.int32), routing_temperature_b=jnp.ones((b,), jnp.float32),
            routing_top_k_b=jnp.ones((b,), jnp.int32),
        )  # fmt: skip
        # Placed where the programs' outputs will be, so the first call and later ones are one program.
        return jax.device_put(slots, self._placement())

    def _placement(self) -> jax.sharding.Sharding:
        """Where the slots live: replicated over the model's mesh, or on its one device."""
        sharding = jax.tree.leaves(self.params)[0].sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))

    @property
    def routing_defaults(self) -> tuple[float, int]:
        moe = self.model.moe
        return (1.0, 1) if moe is None else (float(moe.temperature), int(moe.top_k))

    def warm_up(self) -> None:
        """Compiles every program (each prompt bucket's `admit`, `decode`, `compact`) on a scratch
        state, so no request waits for a compile."""
        s = self._empty()
        row = RowSettings().arrays()
        for p in self.buckets:
            ids = np.full((1, p), self.pad_id, np.int32)
            s, token, _ = admit(
                self.graphdef, self.params, s, ids, np.ones((1, p), np.int32), np.int32(0), row
            )
        s, tokens, _ = decode(self.graphdef, self.params, s)
        s = compact(s, self.max_length)
        jax.block_until_ready(s)

    def submit(self, request: Request) -> None:
        """Queues a request (raises QueueFull when `max_queue` wait already)."""
        try:
            self.queue.put_nowait(request)
        except queue.Full as e:
            raise QueueFull from e

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="meteora-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops the loop after its current program; requests still running are finished as cancelled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """The loop is serving (started, not stopped)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def idle(self) -> bool:
        return not self.active and self.queue.empty()

    # ---------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit_waiting()
                if not self.active:
                    try:
                        request = self.queue.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._admit(request)
                    continue
                self._step()
        finally:
            for slot in list(self.active):
                self._release(slot, "cancelled")
            while not self.queue.empty():
                self.queue.get_nowait().finish("cancelled")

    def _admit_waiting(self) -> None:
        while len(self.active) < self.slots and not self.queue.empty():
            self._admit(self.queue.get_nowait())

    def _admit(self, request: Request) -> None:
        if request.cancelled.is_set():
            request.finish("cancelled")
            return
        slot = next(i for i in range(self.slots) if i not in self.active)
        n = len(request.ids)
        p = prompt_bucket(n)
        ids = np.full((1, p), self.pad_id, np.int32)
        ids[0, p - n :] = request.ids
        mask = np.zeros((1, p), np.int32)
        mask[0, p - n :] = 1
        started = time.monotonic()
        self.state, token, mix = admit(
            self.graphdef, self.params, self.state, ids, mask, np.int32(slot),
            request.row.arrays(),
        )  # fmt: skip
        token, mix = int(token), np.asarray(mix)
        self.stats.busy_seconds += time.monotonic() - started
        self.stats.prompt_tokens += n
        self.stats.first_token_seconds += time.monotonic() - request.submitted
        self.stats.first_tokens += 1
        self.active[slot] = request
        self._deliver(slot, token, mix)

    def _step(self) -> None:
        started = time.monotonic()
        if self.index >= self.capacity:
            self.state = compact(self.state, self.max_length)
            self.index -= self.max_length
            self.stats.compactions += 1
        self.index += 1
        self.state, tokens, mixes = decode(self.graphdef, self.params, self.state)
        tokens, mixes = np.asarray(tokens), np.asarray(mixes)
        self.stats.busy_seconds += time.monotonic() - started
        self.stats.decode_steps += 1
        for slot in list(self.active):
            self._deliver(slot, int(tokens[slot]), mixes[slot])

    def _deliver(self, slot: int, token: int, mix: np.ndarray) -> None:
        request = self.active[slot]
        if request.cancelled.is_set():
            self._release(slot, "cancelled")
            return
        request.produced += 1
        self.stats.generated_tokens += 1
        go_on = request.emit(token, mix)
        if token in request.eos_ids:
            self._release(slot, "eos")
        elif not go_on:
            self._release(slot, "stop")
        elif request.produced >= request.max_tokens:
            self._release(slot, "length")

    def _release(self, slot: int, reason: str) -> None:
        request = self.active.pop(slot)
        self.stats.requests_finished += 1
        request.finish(reason)
