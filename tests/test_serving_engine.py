"""The serving engine: continuous batching over one KV cache, against `generate`.

A tiny fused model (three random adapters, random gates). Requests join and leave a running
batch; each greedy answer must equal `generate`'s for the same prompt alone, a seeded sampled
answer must not depend on what else runs, and traffic must compile nothing after `warm_up`.
"""

import threading

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.generation import generate
from meteora_jax.serving.engine import Engine, Request, RowSettings
from meteora_jax.sharding import make_mesh

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(str(tmp_path_factory.mktemp("serve")), layers=2, hidden=32, rank=2)


@pytest.fixture(scope="module")
def model(setup):
    with pytest.warns(UserWarning, match="untrained"):
        return mj.load_model(setup.base, adapters=setup.adapters, top_k=2)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, slots=3, max_length=MAX_LENGTH, max_queue=16)
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop(timeout=30)


class Collector:
    """A request's tokens and routing as the engine hands them over, and its end."""

    def __init__(self, stop_after: int | None = None):
        self.tokens, self.mixes, self.reason = [], [], None
        self.done = threading.Event()
        self.stop_after = stop_after

    def emit(self, token, mix):
        self.tokens.append(token)
        self.mixes.append(mix)
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def finish(self, reason):
        self.reason = reason
        self.done.set()


def run(engine, prompts, max_tokens, rows=None, eos=()):
    collectors = [Collector() for _ in prompts]
    for i, (ids, c) in enumerate(zip(prompts, collectors, strict=True)):
        row = rows[i] if rows else RowSettings(routing_top_k=2)
        engine.submit(Request(list(ids), max_tokens[i], row, tuple(eos), c.emit, c.finish))
    for c in collectors:
        assert c.done.wait(120), "the engine did not finish a request"
    return collectors


def prompts_of(lengths, seed=0, vocab=60):
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab, n - 1).tolist()] for n in lengths]


class CompileCount:
    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_greedy_answers_equal_generate_while_requests_join_and_leave(model, engine):
    """Seven requests of different lengths and budgets over three slots: rows are refilled while
    others decode and the cache compacts several times; every answer is `generate`'s, and no
    program compiles."""
    lengths, budgets = (5, 12, 3, 20, 7, 16, 9), (30, 4, 30, 19, 30, 20, 28)
    prompts = prompts_of(lengths)
    counter = CompileCount()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        got = run(engine, prompts, budgets)
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    assert counter.count == 0
    assert len(engine.group_sizes) == 2 and engine.program_count == 3 * 2 + 2  # buckets 16, 32, 64
    assert engine.stats.compactions >= 1  # the cache was shifted under running requests
    for ids, budget, c in zip(prompts, budgets, got, strict=True):
        want = generate(model, np.asarray([ids]), max_new_tokens=budget, eos_token_id=[])
        assert c.tokens == np.asarray(want.new_tokens[0]).tolist()
        assert c.reason == "length"
        mix = np.asarray(c.mixes)
        assert mix.shape == (budget, 3)
        np.testing.assert_allclose(mix.sum(-1), 1.0, rtol=1e-5)  # top-2 weights average to 1


def test_seeded_sampling_does_not_depend_on_the_other_rows(engine):
    """A sampled request's tokens depend on its prompt and seed only: alone or beside others
    with other seeds, the same; another seed, another answer."""
    prompt = prompts_of((8,), seed=3)[0]
    sampled = RowSettings(temperature=1.5, top_p=0.95, seed=7, routing_top_k=2)
    alone = run(engine, [prompt], [16], [sampled])[0].tokens
    others = [RowSettings(temperature=1.5, seed=s, routing_top_k=2) for s in (1, 2)]
    crowd = run(engine, [prompts_of((6,), seed=4)[0], prompt, prompts_of((10,), seed=5)[0]], [16] * 3,
                [others[0], sampled, others[1]])  # fmt: skip
    assert crowd[1].tokens == alone
    reseeded = run(
        engine, [prompt], [16], [RowSettings(temperature=1.5, top_p=0.95, seed=8, routing_top_k=2)]
    )
    assert reseeded[0].tokens != alone


def test_forced_adapter_and_eos_and_stop(model, engine):
    """A forced adapter routes every token to it (as `generate`'s adapter_ids); EOS ends a
    request with "eos"; `emit` returning False ends it with "stop" and frees the slot."""
    prompt = prompts_of((6,), seed=6)[0]
    forced = run(engine, [prompt], [10], [RowSettings(adapter=1)])[0]
    want = generate(model, np.asarray([prompt]), max_new_tokens=10, eos_token_id=[], adapter_ids=[1])
    assert forced.tokens == np.asarray(want.new_tokens[0]).tolist()
    assert all(np.argmax(m) == 1 and m[1] == 1.0 for m in forced.mixes)
    eos = run(engine, [prompt], [10], [RowSettings(adapter=1)], eos=(forced.tokens[3],))[0]
    assert eos.reason == "eos" and eos.tokens == forced.tokens[: forced.tokens.index(forced.tokens[3]) + 1]
    stopper = Collector(stop_after=2)
    engine.submit(Request(prompt, 10, RowSettings(adapter=1), (), stopper.emit, stopper.finish))
    assert stopper.done.wait(60) and stopper.reason == "stop" and len(stopper.tokens) == 2


def test_a_model_sharded_over_a_mesh_serves_the_same_answers(setup, model):
    """The model's weights split over 8 devices (fsdp 4 x tensor 2), the slots replicated: the
    same greedy answers as `generate` on one device."""
    with pytest.warns(UserWarning, match="untrained"):
        sharded = mj.load_model(setup.base, adapters=setup.adapters, top_k=2, mesh=make_mesh(1, 4, 2))
    engine = Engine(sharded, slots=2, max_length=MAX_LENGTH, max_queue=4)
    engine.warm_up()
    engine.start()
    try:
        prompts = prompts_of((7, 11), seed=9)
        got = run(engine, prompts, [10, 10])
    finally:
        engine.stop(timeout=30)
    for ids, c in zip(prompts, got, strict=True):
        want = generate(model, np.asarray([ids]), max_new_tokens=10, eos_token_id=[])
        assert c.tokens == np.asarray(want.new_tokens[0]).tolist()


def test_per_row_routing_settings_equal_each_rows_own_call():
    """`route` with per-token settings (a temperature, a k and forced / gated choices per token)
    gives each token what a call with that token's settings alone gives."""
    from meteora_jax.ops.routing import RoutingSettings, route

    rng = np.random.default_rng(0)
    x_md = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    gate_dl = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    temperature, k = np.array([0.5, 3.0, 1.0, 1.0], np.float32), np.array([3, 2, 2, 3], np.int32)
    forced, gated = np.array([-2, -2, 4, -1], np.int32), np.array([True, True, False, False])
    mixed = RoutingSettings(
        jnp.asarray(temperature), top_k=3, row_top_k=jnp.asarray(k), gated_rows=jnp.asarray(gated)
    )
    got = route(x_md, gate_dl, mixed, jnp.asarray(forced), jnp.asarray(gated))
    for m in range(4):
        if gated[m]:
            alone = route(
                x_md[m : m + 1], gate_dl, RoutingSettings(jnp.float32(temperature[m]), top_k=int(k[m]))
            )
            np.testing.assert_array_equal(got.ids[m, : k[m]], alone.ids[0])
            np.testing.assert_allclose(got.weights[m, : k[m]], alone.weights[0], rtol=1e-6)
            assert not np.any(got.weights[m, k[m] :])  # columns past the row's k weigh nothing
        else:
            alone = route(
                x_md[m : m + 1], gate_dl, RoutingSettings(jnp.float32(1.0)), jnp.asarray(forced[m : m + 1])
            )
            assert got.ids[m, 0] == alone.ids[0, 0] and got.weights[m, 0] == alone.weights[0, 0]
            assert not np.any(got.weights[m, 1:])


def test_start_before_warm_up_is_refused(model):
    """The loop runs compiled programs only: starting before they exist says what to call."""
    engine = Engine(model, slots=1, max_length=MAX_LENGTH, max_queue=1)
    with pytest.raises(RuntimeError, match="Engine.start: call warm_up first"):
        engine.start()
