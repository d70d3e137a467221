"""The Pallas MoE-LoRA kernels (TPU and GPU flavours) in interpret mode on CPU.

Property tests over shapes (tokens not a multiple of the tile, in / out not multiples of 128,
L from 1 to 64, mixed ranks 1-64, k in {1, 2, 4}, float32 / bfloat16) and routings (all tokens
on one adapter, uniform spread, a few adapters only so most groups are empty), comparing the
output and every gradient (dx, dcoef, dA, dB) with `pallas_kernels.reference.delta_reference`
within `pallas_kernels.reference.tolerance`;
plus the metadata invariants, the frozen-adapter mode (no dA / dB kernels) and the dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pallas_kernels import Tiling, default_tiling, delta_reference, make_plan, moe_lora_delta, tolerance
from pallas_kernels.metadata import decode_groups, pack_a, pack_b, pair_groups, unpack_a, unpack_b
from pallas_kernels.reference import delta_reference_dense
from pallas_kernels.tiling import FLAVORS

# Small tiles so a few dozen tokens already span several row tiles, packs and K / N blocks; a
# decode threshold of 4 tokens so the decode kernel is drawn too.
TINY = {
    "tpu": Tiling(flavor="tpu", tile_m=16, tile_d=128, tile_o=128, lanes=128, decode_tokens=4),
    "gpu": Tiling(flavor="gpu", tile_m=16, tile_d=32, tile_o=32, lanes=32, decode_tokens=4),
}


def make_problem(seed, m, d, o, ranks, k, routing, dtype):
    """Random inputs; adapter i has rank ranks[i], zero-padded to max(ranks).

    routing: "one" = every token's first choice is adapter 0 (MeteoRA's usual case: one task per
    sequence), "uniform" = k distinct adapters at random, "few" = choices among k + 1 adapters
    only, so most groups are empty.
    """
    rng = np.random.default_rng(seed)
    n, r = len(ranks), max(ranks)
    a = np.zeros((n, d, r), np.float32)
    b = np.zeros((n, r, o), np.float32)
    for i, ri in enumerate(ranks):
        a[i, :, :ri] = rng.standard_normal((d, ri)) / np.sqrt(d)
        b[i, :ri, :] = rng.standard_normal((ri, o)) / np.sqrt(ri)
    pool = {"few": rng.choice(n, min(n, k + 1), replace=False)}.get(routing, np.arange(n))
    ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(m)])
    if routing == "one":
        for row in ids:
            row[row == 0], row[0] = row[0], 0
    return dict(
        x=jnp.asarray(rng.standard_normal((m, d)), dtype),
        a=jnp.asarray(a, dtype),
        b=jnp.asarray(b, dtype),
        ids=jnp.asarray(ids, jnp.int32),
        coef=jnp.asarray(rng.uniform(-1.0, 2.0, (m, k)), jnp.float32),
        cotangent=jnp.asarray(rng.standard_normal((m, o)), jnp.float32),
    )


def _loss(fn, p, x, a, b, coef):
    y = fn(x, a, b, p["ids"], coef)
    return jnp.sum(y.astype(jnp.float32) * p["cotangent"]), y


@functools.partial(jax.jit, static_argnames=("tiling", "train_adapters", "interpret"))
def kernel_value_and_grads(p, tiling, train_adapters=None, interpret=True):
    fn = functools.partial(moe_lora_delta, tiling=tiling, train_adapters=train_adapters, interpret=interpret)
    grads, y = jax.grad(functools.partial(_loss, fn, p), argnums=(0, 1, 2, 3), has_aux=True)(
        p["x"], p["a"], p["b"], p["coef"]
    )
    return y, grads


@jax.jit
def reference_value_and_grads(p):
    f32 = {n: p[n].astype(jnp.float32) for n in ("x", "a", "b", "coef")}
    grads, y = jax.grad(functools.partial(_loss, delta_reference, p), argnums=(0, 1, 2, 3), has_aux=True)(
        f32["x"], f32["a"], f32["b"], f32["coef"]
    )
    return y, grads


def pallas_calls(fn, *args) -> list:
    """The pallas_call equations of fn's jaxpr (walking nested jaxprs), in order."""
    calls = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                calls.append(eqn)
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return calls


def kernel_names(fn, *args) -> list[str]:
    return [eqn.params["name"] for eqn in pallas_calls(fn, *args)]


@pytest.fixture
def record_max_error(request):
    """`record(label, value)`: keep the largest value per label for the end-of-run error summary
    (conftest prints `err:` properties); hypothesis runs many examples in one test call."""

    def record(label: str, value: float) -> None:
        props = request.node.user_properties
        key = f"err:{label}"
        old = [i for i, (k, _) in enumerate(props) if k == key]
        if not old:
            props.append((key, value))
        elif value > props[old[0]][1]:
            props[old[0]] = (key, value)

    return record


# ---------------------------------------------------------------------------------------------
# Output and every gradient against the reference.


@st.composite
def problems(draw):
    n_adapters = draw(st.sampled_from([1, 2, 3, 5, 9, 64]))
    return dict(
        m=draw(st.integers(1, 40)),
        d=draw(st.integers(1, 160)),
        o=draw(st.integers(1, 160)),
        ranks=draw(st.lists(st.integers(1, 64), min_size=n_adapters, max_size=n_adapters)),
        k=min(n_adapters, draw(st.sampled_from([1, 2, 4]))),
        routing=draw(st.sampled_from(["one", "uniform", "few"])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


def _case(m, d, o, ranks, k, routing, dtype=jnp.float32, seed=0):
    return dict(m=m, d=d, o=o, ranks=ranks, k=k, routing=routing, dtype=dtype, seed=seed)


@pytest.mark.parametrize("flavor", FLAVORS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=problems())
# The cases that must always run: MeteoRA's 28 rank-8 adapters with every token on one adapter;
# 64 adapters of mixed ranks up to 64 with k = 4; mostly-empty groups; decode; the smallest shape.
@example(case=_case(37, 130, 70, [8] * 28, 2, "one"))
@example(case=_case(29, 33, 141, list(range(1, 65)), 4, "uniform", jnp.bfloat16, seed=1))
@example(case=_case(19, 20, 9, [3, 16, 1, 7, 5, 2, 8, 4, 6, 12, 2, 2, 9, 1, 3, 5, 11], 1, "few", seed=2))
@example(case=_case(3, 45, 150, [4, 8, 2], 2, "uniform", jnp.bfloat16, seed=3))
@example(case=_case(1, 1, 1, [1], 1, "one", seed=4))
def test_delta_and_gradients_match_reference(flavor, case, record_max_error):
    case = dict(case)
    p = make_problem(case.pop("seed"), **{k: v for k, v in case.items() if k != "dtype"}, dtype=case["dtype"])
    y, grads = kernel_value_and_grads(p, TINY[flavor])
    y_ref, grads_ref = reference_value_and_grads(p)
    tol = tolerance(case["dtype"])
    assert y.shape == y_ref.shape and y.dtype == p["x"].dtype
    for name, got, want in [
        ("delta", y, y_ref),
        *zip(("dx", "dA", "dB", "dcoef"), grads, grads_ref, strict=True),
    ]:
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert got.shape == want.shape, name
        scale = 1.0 + float(np.abs(want).max(initial=0.0))
        err = float(np.abs(got - want).max(initial=0.0)) / scale
        record_max_error(f"{flavor} {jnp.dtype(case['dtype']).name} {name} (max, relative)", err)
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (scaled by {scale:.3g}) for {case}"


def test_references_agree():
    p = make_problem(5, 17, 30, 20, [3, 8, 1, 5], 2, "uniform", jnp.float32)
    args = (p["x"], p["a"], p["b"], p["ids"], p["coef"])
    want = delta_reference(*args)
    atol = tolerance(jnp.float32) * (1 + float(jnp.abs(want).max()))
    np.testing.assert_allclose(delta_reference_dense(*args), want, rtol=1e-5, atol=atol)


# Pallas lowers kernels to Mosaic (TPU) and Triton (GPU) IR in Python, so the compiled path's block
# shapes, primitives and scalar prefetch are checked here without the hardware (compiling that IR
# to machine code needs the device; `python -m meteora_jax.bench.device_check` does it there).
@pytest.mark.parametrize("platform, target", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_compiled_kernels_lower_for_tpu_and_gpu(platform, target):
    tiling = default_tiling(platform)
    for m, dtype in ((40, jnp.bfloat16), (3, jnp.float32)):  # prefill kernels, decode kernel
        p = make_problem(0, m, 200, 300, [8] * 20 + [64], 2, "uniform", dtype)
        traced = kernel_value_and_grads.trace(p, tiling, interpret=False)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        # prefill: shrink + expand, then 4 backward; decode: 1 forward, the shrink redone, 4 backward
        assert text.count(f"custom_call @{target}") == 6, (m, dtype)


# ---------------------------------------------------------------------------------------------
# Which kernels run: frozen adapters, decode dispatch, interpret resolution.


@pytest.mark.parametrize("flavor", FLAVORS)
def test_frozen_adapters_run_no_dA_dB_kernels(flavor):
    p = make_problem(0, 24, 40, 30, [4, 8, 2], 2, "uniform", jnp.float32)
    tiling = TINY[flavor]
    gmm, tgmm = f"moe_lora_gmm_{flavor}", f"moe_lora_tgmm_{flavor}"

    def grad_fn(argnums, train_adapters=None):
        fn = functools.partial(moe_lora_delta, tiling=tiling, train_adapters=train_adapters)
        return jax.grad(lambda *args: _loss(fn, p, *args)[0], argnums=argnums)

    args = (p["x"], p["a"], p["b"], p["coef"])
    # Everything trained: forward shrink + expand, dy @ B^T, dh @ A^T, and the two tgmms.
    assert sorted(kernel_names(grad_fn((0, 1, 2, 3)), *args)) == [gmm] * 4 + [tgmm] * 2
    # Gate-only training (adapters closed over, as an optimizer over GateParam does): no tgmm.
    assert sorted(kernel_names(grad_fn((0, 3)), *args)) == [gmm] * 4
    # Adapters passed to grad but declared frozen: still no tgmm, and zero gradients.
    assert tgmm not in kernel_names(grad_fn((0, 1, 2, 3), train_adapters=False), *args)
    # Only B: no dh @ A^T, no dA, no dy @ B^T.
    assert sorted(kernel_names(grad_fn((2,)), *args)) == [gmm] * 2 + [tgmm]
    _, (dx, da, db, dcoef) = kernel_value_and_grads(p, tiling, train_adapters=False)
    _, (dx_ref, _, _, dcoef_ref) = reference_value_and_grads(p)
    assert not np.any(np.asarray(da)) and not np.any(np.asarray(db))
    tol = tolerance(jnp.float32)
    np.testing.assert_allclose(dx, dx_ref, atol=tol * (1 + float(np.abs(dx_ref).max())))
    np.testing.assert_allclose(dcoef, dcoef_ref, atol=tol * (1 + float(np.abs(dcoef_ref).max())))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_decode_kernel_for_few_tokens_only(flavor):
    tiling = TINY[flavor]
    for m, expected in ((tiling.decode_tokens, f"moe_lora_decode_{flavor}"), (9, f"moe_lora_gmm_{flavor}")):
        p = make_problem(0, m, 20, 30, [8, 8], 2, "uniform", jnp.float32)
        fn = functools.partial(moe_lora_delta, a_ldr=p["a"], b_lro=p["b"], ids_mk=p["ids"], coef_mk=p["coef"])
        names = kernel_names(functools.partial(fn, tiling=tiling), p["x"])
        assert names[0] == expected and len(set(names)) == 1, names


def test_interpret_defaults_to_cpu_and_tiling_to_platform():
    p = make_problem(0, 20, 8, 8, [2], 1, "one", jnp.float32)
    calls = pallas_calls(lambda x: moe_lora_delta(x, p["a"], p["b"], p["ids"], p["coef"]), p["x"])
    assert calls and all(e.params["interpret"] for e in calls)
    assert all(e.params["name"].endswith("_tpu") for e in calls)  # the CPU interprets the TPU flavour
    assert default_tiling("gpu").flavor == default_tiling("cuda").flavor == "gpu"
    assert default_tiling("tpu").flavor == default_tiling("cpu").flavor == "tpu"


def test_bad_shapes_and_tilings_are_refused():
    p = make_problem(0, 5, 8, 8, [2, 2], 2, "uniform", jnp.float32)
    with pytest.raises(ValueError, match="do not chain"):
        moe_lora_delta(p["x"][:, :7], p["a"], p["b"], p["ids"], p["coef"])
    with pytest.raises(ValueError, match="ids"):
        moe_lora_delta(p["x"], p["a"], p["b"], p["ids"][:, :1], p["coef"])
    with pytest.raises(ValueError, match="flavor"):
        Tiling(flavor="npu")
    with pytest.raises(ValueError, match="multiple of 128"):
        Tiling(flavor="tpu", tile_d=96)
    with pytest.raises(ValueError, match="power of two"):
        Tiling(flavor="gpu", tile_o=48)
    empty = moe_lora_delta(p["x"][:0], p["a"], p["b"], p["ids"][:0], p["coef"][:0])
    assert empty.shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# Metadata (pure jnp).


def _plan(flavor, m=30, k=2, d=40, o=24, adapters=5, rank=8, lanes=None):
    tiling = TINY[flavor] if lanes is None else Tiling(flavor=flavor, lanes=lanes)
    return make_plan(
        tiling, tokens=m, choices=k, d=d, o=o, adapters=adapters, rank=rank, itemsize=4, interpret=True
    )


@pytest.mark.parametrize(
    "flavor, rank, adapters, lanes, expected",
    [
        ("tpu", 8, 28, 128, (8, 16, 128, 2)),  # 16 rank-8 adapters per 128-lane pack
        ("tpu", 64, 64, 128, (64, 2, 128, 32)),
        ("tpu", 5, 1, 128, (8, 16, 128, 1)),  # TPU never goes below 128 lanes
        ("tpu", 200, 3, 128, (256, 1, 256, 3)),  # above the lanes: one adapter, whole lanes
        ("gpu", 8, 28, 64, (8, 8, 64, 4)),
        ("gpu", 3, 2, 64, (4, 4, 16, 1)),  # GPU narrows the pack to what L*S needs (>= 16)
        ("gpu", 100, 2, 64, (128, 1, 128, 2)),
    ],
)
def test_pack_layout(flavor, rank, adapters, lanes, expected):
    plan = _plan(flavor, rank=rank, adapters=adapters, lanes=lanes)
    assert (plan.slot, plan.per_pack, plan.width, plan.num_packs) == expected


@pytest.mark.parametrize("flavor", FLAVORS)
def test_pack_unpack_round_trip_and_slots(flavor):
    plan = _plan(flavor, adapters=7, rank=5, d=40, o=24)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 40, 5)).astype(np.float32)
    b = rng.standard_normal((7, 5, 24)).astype(np.float32)
    a_q, b_q = np.asarray(pack_a(jnp.asarray(a), plan)), np.asarray(pack_b(jnp.asarray(b), plan))
    s, g = plan.slot, plan.per_pack
    for i in range(7):
        q, lane = divmod(i, g)
        np.testing.assert_array_equal(a_q[q, :40, lane * s : lane * s + 5], a[i])
        np.testing.assert_array_equal(b_q[q, lane * s : lane * s + 5, :24], b[i])
    np.testing.assert_array_equal(unpack_a(jnp.asarray(a_q), plan), a)
    np.testing.assert_array_equal(unpack_b(jnp.asarray(b_q), plan), b)


@pytest.mark.parametrize("routing", ["one", "uniform", "few"])
def test_pair_group_visits_cover_every_row_once(routing):
    plan = _plan("tpu", m=45, k=2, adapters=40, rank=32)  # 4 per pack, 10 packs
    ids = make_problem(1, 45, 4, 4, [1] * 40, 2, routing, jnp.float32)["ids"]
    pg = jax.jit(pair_groups, static_argnums=1)(ids, plan)
    g = pg.groups
    starts, ends = np.asarray(g.group_starts), np.asarray(pg.group_ends)
    # Forward visits: each real row is stored by exactly one live visit (its pack's).
    owners = np.zeros(plan.pairs_pad, int)
    for v in range(int(g.num_visits)):
        rows = int(g.visit_tile[v]) * plan.tm + np.arange(plan.tm)
        q = int(g.visit_adapter[v])
        owners[rows[(rows >= starts[q]) & (rows < ends[q])]] += 1
    np.testing.assert_array_equal(owners, np.arange(plan.pairs_pad) < plan.pairs)
    # Transposed visits: every pack, in one consecutive run each.
    groups = np.asarray(pg.tvisit_group)[: int(pg.tvisit_count)]
    runs = groups[np.r_[True, groups[1:] != groups[:-1]]]
    np.testing.assert_array_equal(runs, np.arange(plan.num_packs))
    # Sorted rows: the right token and slot; GPU tile ranges: first and last pack of the tile.
    order = np.asarray(g.order)
    np.testing.assert_array_equal(np.asarray(pg.token_p)[: plan.pairs], order // 2)
    np.testing.assert_array_equal(np.asarray(pg.slot_p)[: plan.pairs], np.asarray(ids).reshape(-1)[order] % 4)
    packs = np.asarray(g.sorted_adapter)
    for t in range(plan.num_tiles):
        tile = packs[t * plan.tm : (t + 1) * plan.tm]
        assert (int(pg.tile_lo[t]), int(pg.tile_hi[t])) == (tile[0], tile[-1])


def test_decode_groups_list_distinct_packs():
    plan = _plan("tpu", m=3, k=2, adapters=40, rank=32)
    dg = decode_groups(jnp.asarray([[0, 9], [1, 39], [8, 2]], jnp.int32), plan)
    assert int(dg.num_live) == 3
    np.testing.assert_array_equal(dg.visit_pack, [0, 2, 9, 9, 9, 9])
    np.testing.assert_array_equal(dg.visit_of_pair, [0, 1, 0, 2, 1, 0])
