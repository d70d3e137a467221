"""Continuous batching: a fixed number of decode slots over one KV cache, fed by a thread.

Dimensions: B slots, C cache slots per row, G prompts prefilled together, P a prompt bucket,
V vocab, L adapters, Y layers.

Rows share the cache's write position (`KVCache.index`), as in `generate`; what makes them
independent requests is each row's `valid` mask: a token's RoPE position is the count of valid
slots before it, so a row may start anywhere. Three kinds of compiled program serve all traffic:

- `admit` (one per prompt bucket and group size G, powers of two up to B): prefills G waiting
  prompts of one bucket into a fresh G-row cache, copies each into a free row at slots
  [index - P, index), sets those rows' sampling and routing settings and draws their first
  tokens (a burst of requests costs one prefill, not one each);
- `decode` (one): feeds every row's last token at `index` and draws the next one per row (each
  row its own temperature, top-p, seed and routing);
- `compact` (one): when `index` reaches C, shifts every row left by `max_length`; a live request
  holds at most `max_length` slots, so it loses none.

C is the largest prompt bucket (at least `max_length`) plus `max_length`: `index` never falls
below the largest bucket, so any prompt fits before it, and a compaction comes every
`max_length` steps.

Each draw also returns the routing that wrote the token: the adapters' weights averaged over all
layers and projections (L,). `Engine.warm_up` compiles them ahead of time; the loop calls
only the compiled executables.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import MoELoRAConfig
from meteora_jax.generation import GenerationSettings, prompt_bucket, top_p_filter
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

    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    seed: int = GenerationSettings.seed
    adapter: int = GATES  # an adapter index forced on every token, -1: none (the base), GATES: the gates
    routing_temperature: float = MoELoRAConfig.temperature
    routing_top_k: int = 1

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Host scalars: a program takes them as they are (no conversion program per value)."""
        return (
            np.float32(self.temperature), np.float32(self.top_p), np.uint32(self.seed),
            np.int32(self.adapter), np.float32(self.routing_temperature), np.int32(self.routing_top_k),
        )  # fmt: skip


def draw(logits_bv, temperature_b, top_p_b, seed_b, step_b) -> jax.Array:
    """(B,) next tokens, each row by its own settings: argmax at temperature 0, else a draw from
    logits / T under the row's top-p, keyed by (seed, step) so a row never depends on others.
    The sampling and the top-p sort run only when some row asks for them (`lax.cond`)."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def sample(logits_bv):
        scaled_bv = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
        nucleus = jax.vmap(lambda row_v, top_p: top_p_filter(row_v[None], top_p)[0])
        scaled_bv = jax.lax.cond(jnp.any(top_p_b < 1), lambda x: nucleus(x, top_p_b), lambda x: x, scaled_bv)
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seed_b, step_b)
        sampled_b = jax.vmap(jax.random.categorical)(keys, scaled_bv).astype(jnp.int32)
        return jnp.where(temperature_b > 0, sampled_b, greedy_b)

    return jax.lax.cond(jnp.any(temperature_b > 0), sample, lambda _: greedy_b, logits_bv)


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


def _set_rows(a: jax.Array, slots_g: jax.Array, values_g) -> jax.Array:
    return a.at[slots_g].set(jnp.asarray(values_g, a.dtype))


def admit(
    graphdef, params, s: Slots, ids_gp, mask_gp, slots_g, rows: tuple
) -> tuple[Slots, jax.Array, jax.Array]:
    """Prefills G prompts (left-padded to one bucket P) together into rows `slots_g` (G,);
    `rows`: the `RowSettings.arrays` fields stacked (G,). Returns (slots, first tokens (G,),
    their routing (G, L))."""
    module = nnx.merge(graphdef, params)
    temperature, top_p, seed, adapter, routing_temperature, routing_top_k = rows
    s = dataclasses.replace(
        s,
        temperature_b=_set_rows(s.temperature_b, slots_g, temperature),
        top_p_b=_set_rows(s.top_p_b, slots_g, top_p),
        seed_b=_set_rows(s.seed_b, slots_g, seed),
        forced_b=_set_rows(s.forced_b, slots_g, adapter),
        routing_temperature_b=_set_rows(s.routing_temperature_b, slots_g, routing_temperature),
        routing_top_k_b=_set_rows(s.routing_top_k_b, slots_g, routing_top_k),
    )
    routing = _routing(module, s)
    if routing is not None:
        pick = lambda a: a[slots_g]  # noqa: E731
        routing = dataclasses.replace(
            routing, temperature=pick(routing.temperature), forced_ids=pick(routing.forced_ids),
            row_top_k=pick(routing.row_top_k), gated_rows=pick(routing.gated_rows),
        )  # fmt: skip
    g, p = ids_gp.shape
    fresh = KVCache.init(module.config, g, p, dtype=s.cache.k.dtype)
    out = module(ids_gp, attention_mask=mask_gp, cache=fresh, routing=routing, return_routing=True)
    start = s.cache.index - p
    k, v, valid = s.cache.k, s.cache.v, s.cache.valid
    for i in range(g):  # G row copies into the shared cache
        k = jax.lax.dynamic_update_slice(k, out.cache.k[:, i : i + 1], (0, slots_g[i], start, 0, 0))
        v = jax.lax.dynamic_update_slice(v, out.cache.v[:, i : i + 1], (0, slots_g[i], start, 0, 0))
        row_c = jax.lax.dynamic_update_slice(
            jnp.zeros(valid.shape[1], bool), mask_gp[i].astype(bool), (start,)
        )
        valid = valid.at[slots_g[i]].set(row_c)
    tokens = draw(
        out.logits[:, -1], jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
        jnp.asarray(seed, jnp.uint32), jnp.zeros((g,), jnp.int32),
    )  # fmt: skip
    s = dataclasses.replace(
        s,
        cache=dataclasses.replace(s.cache, k=k, v=v, valid=valid),
        last_b=_set_rows(s.last_b, slots_g, tokens),
        step_b=_set_rows(s.step_b, slots_g, 1),
    )
    return s, tokens, _mix(module, out.routing, g, p - 1)


def decode(graphdef, params, s: Slots) -> tuple[Slots, jax.Array, jax.Array]:
    """One step for every row: feeds its last token, draws the next; returns (slots, tokens (B,),
    their routing (B, L)). Free rows decode too (their results are dropped)."""
    module = nnx.merge(graphdef, params)
    routing = _routing(module, s)
    out = module(s.last_b[:, None], cache=s.cache, routing=routing, return_routing=True)
    tokens = draw(out.logits[:, -1], s.temperature_b, s.top_p_b, s.seed_b, s.step_b)
    s = dataclasses.replace(s, cache=out.cache, last_b=tokens, step_b=s.step_b + 1)
    return s, tokens, _mix(module, out.routing, tokens.shape[0], 0)


def compact(s: Slots, *, shift: int) -> Slots:
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
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    produced: int = 0  # tokens emitted so far


@dataclasses.dataclass
class EngineStats:
    """What the engine thread counts (the server's own metrics count requests, tokens and times)."""

    requests_cancelled: int = 0  # cancelled before or while running (a client gone, the engine stopped)
    generated_tokens: int = 0
    compactions: int = 0


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
        # Prompts prefilled together: powers of two up to the slots (a burst of requests costs
        # one prefill per bucket, not one per request).
        self.group_sizes = tuple(1 << i for i in range(slots.bit_length()) if 1 << i <= slots)
        self.stats = EngineStats()
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.active: dict[int, Request] = {}
        self.state = self._empty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._admit_programs: dict[tuple[int, int], Callable] = {}  # (bucket, group size) -> `admit`
        self._decode_program: Callable | None = None
        self._compact_program: Callable | None = None

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
    def program_count(self) -> int:
        """Programs `warm_up` compiles: `admit` per bucket and group size, `decode`, `compact`."""
        return len(self.buckets) * len(self.group_sizes) + 2

    @property
    def routing_defaults(self) -> tuple[float, int]:
        moe = self.model.moe
        return (1.0, 1) if moe is None else (float(moe.temperature), int(moe.top_k))

    def warm_up(self) -> None:
        """Compiles every program ahead of time (`admit` per bucket and group size, `decode`,
        `compact`); the loop calls only these executables, so traffic cannot compile anything."""
        s = self._empty()
        row = RowSettings().arrays()
        # Outputs stay where the inputs are, so each program's result is the next one's input as
        # compiled (XLA would otherwise pick its own layout for the cache).
        placement = self._placement()
        state = jax.tree.map(lambda _: placement, s)
        outputs = (state, placement, placement)
        admit_jit = jax.jit(partial(admit, self.graphdef), donate_argnums=(1,), out_shardings=outputs)
        for p in self.buckets:
            for g in self.group_sizes:
                ids = np.full((g, p), self.pad_id, np.int32)
                rows = tuple(np.stack([value] * g) for value in row)
                slots = np.arange(g, dtype=np.int32)
                lowered = admit_jit.lower(self.params, s, ids, np.ones((g, p), np.int32), slots, rows)
                self._admit_programs[(p, g)] = lowered.compile()
        decode_jit = jax.jit(partial(decode, self.graphdef), donate_argnums=(1,), out_shardings=outputs)
        self._decode_program = decode_jit.lower(self.params, s).compile()
        compact_jit = jax.jit(
            partial(compact, shift=self.max_length), donate_argnums=(0,), out_shardings=state
        )
        self._compact_program = compact_jit.lower(s).compile()

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
        if self._decode_program is None:
            raise RuntimeError("Engine.start: call warm_up first (it compiles the programs)")
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
            self._serve()
        except Exception:
            logging.getLogger(__name__).exception("the serving engine stopped on an error")
            raise
        finally:
            for slot in list(self.active):
                self._release(slot, "cancelled")
            while not self.queue.empty():
                self.queue.get_nowait().finish("cancelled")

    def _serve(self) -> None:
        """Admits waiting requests and decodes until `stop`."""
        while not self._stop.is_set():
            if not self.active:
                try:  # idle: wait for a request rather than spin
                    first = self.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._admit_waiting([first])
            else:
                self._admit_waiting([])
            if self.active:
                self._step()

    def _admit_waiting(self, taken: list[Request]) -> None:
        """Admits as many waiting requests as there are free slots, those of one prompt bucket
        together, in groups of the compiled sizes (largest first)."""
        free = [i for i in range(self.slots) if i not in self.active]
        while len(taken) < len(free) and not self.queue.empty():
            taken.append(self.queue.get_nowait())
        by_bucket: dict[int, list[Request]] = {}
        for request in taken:
            if request.cancelled.is_set():
                self.stats.requests_cancelled += 1
                request.finish("cancelled")
            else:
                by_bucket.setdefault(prompt_bucket(len(request.ids)), []).append(request)
        for p, group in by_bucket.items():
            while group:
                g = max(size for size in self.group_sizes if size <= len(group))
                self._admit(p, group[:g], free[:g])
                group, free = group[g:], free[g:]

    def _admit(self, p: int, requests: list[Request], slots: list[int]) -> None:
        g = len(requests)
        ids = np.full((g, p), self.pad_id, np.int32)
        mask = np.zeros((g, p), np.int32)
        for i, request in enumerate(requests):
            n = len(request.ids)
            ids[i, p - n :] = request.ids
            mask[i, p - n :] = 1
        rows = tuple(np.stack(column) for column in zip(*(r.row.arrays() for r in requests), strict=True))
        self.state, tokens, mixes = self._admit_programs[(p, g)](
            self.params, self.state, ids, mask, np.asarray(slots, np.int32), rows
        )
        tokens, mixes = np.asarray(tokens), np.asarray(mixes)
        for request, slot, token, mix in zip(requests, slots, tokens, mixes, strict=True):
            self.active[slot] = request
            self._deliver(slot, int(token), mix)

    def _step(self) -> None:
        if self.index >= self.capacity:
            self.state = self._compact_program(self.state)
            self.index -= self.max_length
            self.stats.compactions += 1
        self.index += 1
        self.state, tokens, mixes = self._decode_program(self.params, self.state)
        tokens, mixes = np.asarray(tokens), np.asarray(mixes)
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
        self.stats.requests_cancelled += reason == "cancelled"
        request.finish(reason)
