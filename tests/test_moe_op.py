"""The MoE-LoRA op: every backend against the jnp reference and a torch statement of docs/method.md."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meteora_jax.ops import BACKENDS, moe_lora, moe_lora_reference
from meteora_jax.ops.moe_lora import choose_backend
from meteora_jax.ops.routing import RoutingSettings, route
from meteora_jax.sharding import make_mesh
from pallas_kernels.grouping import group_chunks
from pallas_kernels.reference import tolerance


def random_layer(seed, m, d, o, ranks, dtype=jnp.float32):
    """Random op inputs; adapter i has rank ranks[i] (zero-padded to the largest)."""
    rng = np.random.default_rng(seed)
    n, r = len(ranks), max(ranks)
    a = np.zeros((n, d, r), np.float32)
    b = np.zeros((n, r, o), np.float32)
    for i, ri in enumerate(ranks):
        a[i, :, :ri] = rng.standard_normal((d, ri)) / np.sqrt(d)
        b[i, :ri, :] = rng.standard_normal((ri, o)) * 0.5
    arrays = dict(
        x_md=rng.standard_normal((m, d)),
        kernel_do=rng.standard_normal((d, o)) / np.sqrt(d),
        gate_dl=rng.standard_normal((d, n)),
        a_ldr=a,
        b_lro=b,
        scale_l=rng.uniform(0.5, 2.0, n),
    )
    return {k: jnp.asarray(v, dtype if k != "scale_l" else jnp.float32) for k, v in arrays.items()}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 37),
    d=st.integers(1, 40),
    o=st.integers(1, 40),
    ranks=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    k=st.sampled_from([1, 2, 4]),
    temperature=st.sampled_from([1.0, 0.5, 7.0]),
    seed=st.integers(0, 2**16),
)
def test_backend_matches_reference_forward_and_gradients(backend, m, d, o, ranks, k, temperature, seed):
    k = min(k, len(ranks))
    args = random_layer(seed, m, d, o, ranks)
    routing = RoutingSettings(jnp.float32(temperature), top_k=k)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, o)), jnp.float32)
    wrt = ("x_md", "gate_dl", "a_ldr", "b_lro")

    def forward_and_grads(fn):
        """(y, routing, gradients of <y, cotangent> wrt x, gate, A, B), compiled once."""

        def loss(diff):
            out, r = fn(**{**args, **diff}, settings=routing)
            return jnp.sum(out * cotangent), (out, r)

        (_, (out, r)), grads = jax.value_and_grad(loss, has_aux=True)({n: args[n] for n in wrt})
        return out, r, grads

    y, r, grads = jax.jit(lambda: forward_and_grads(lambda **kw: moe_lora(**kw, backend=backend)))()
    y_ref, r_ref, grads_ref = jax.jit(lambda: forward_and_grads(moe_lora_reference))()
    np.testing.assert_array_equal(r.ids, r_ref.ids)
    np.testing.assert_allclose(r.weights, r_ref.weights, atol=1e-6)
    tol = tolerance(jnp.float32)
    np.testing.assert_allclose(y, y_ref, atol=tol * (1 + np.abs(y_ref).max()))
    for name in wrt:
        scale = 1 + float(jnp.abs(grads_ref[name]).max())
        np.testing.assert_allclose(grads[name], grads_ref[name], atol=tol * scale, err_msg=f"d{name}")


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2), min_size=1, max_size=40),
    tm=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_group_chunks_cover_each_sorted_row_once_within_its_group(ids, tm):
    """Skewed or spread routing alike: every sorted row lies in exactly one live chunk, a chunk's
    rows are all of its group, a group of at most tm rows is one chunk, and V = L + P // tm suffice."""
    ids_mk = np.asarray(ids, np.int32)
    chunks = jax.jit(group_chunks, static_argnums=(1, 2))(jnp.asarray(ids_mk), 6, tm)
    sorted_group = np.asarray(chunks.pairs.sorted_group)
    live = int(chunks.num_chunks)
    assert live <= chunks.chunk_group.shape[0] == 6 + ids_mk.size // tm
    covered = np.zeros(ids_mk.size, int)
    for c in range(chunks.chunk_group.shape[0]):
        rows = int(chunks.chunk_start[c]) + np.flatnonzero(np.asarray(chunks.row_mask(c)))
        assert (c < live) == (rows.size > 0)
        assert (sorted_group[rows] == int(chunks.chunk_group[c])).all()
        covered[rows] += 1
    assert (covered == 1).all()
    sizes = np.bincount(ids_mk.ravel(), minlength=6)
    assert live == sum(-(-s // tm) for s in sizes)


@pytest.mark.parametrize("backend", ["xla_grouped", "ragged", "pallas"])
def test_sorting_backends_run_per_data_shard_under_a_mesh(backend, monkeypatch):
    """Under a (2, 2, 2) mesh the backends that sort all tokens (and the Pallas call) run on each
    device's 32 / 4 = 8 tokens, not on all 32 gathered; output and gradients (x, gate, A, B) equal
    one device's."""
    op = importlib.import_module("meteora_jax.ops.moe_lora")  # the module, not the function of that name

    args = random_layer(3, 32, 24, 20, [4, 6, 8, 5, 7])
    routing = RoutingSettings(jnp.float32(1.0), top_k=2)
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal((32, 20)), jnp.float32)
    wrt = ("x_md", "gate_dl", "a_ldr", "b_lro")
    inner = {"xla_grouped": "_grouped_delta", "ragged": "_ragged_delta", "pallas": "_pallas_delta"}[backend]
    delta_fn, seen = getattr(op, inner), []

    def spy(x_md, *rest):
        seen.append(x_md.shape[0])
        return delta_fn(x_md, *rest)

    monkeypatch.setattr(op, inner, spy)

    def loss(diff):
        out, _ = moe_lora(**{**args, **diff}, settings=routing, backend=backend)
        return jnp.sum(out * cotangent), out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y_one), grads_one = run({n: args[n] for n in wrt})
    assert seen == [32]
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        (_, y_mesh), grads_mesh = jax.jit(jax.value_and_grad(loss, has_aux=True))({n: args[n] for n in wrt})
    assert seen[1:] and set(seen[1:]) == {8}
    tol = tolerance(jnp.float32)
    np.testing.assert_allclose(y_mesh, y_one, atol=tol * (1 + np.abs(y_one).max()))
    for name in wrt:
        scale = 1 + float(jnp.abs(grads_one[name]).max())
        np.testing.assert_allclose(grads_mesh[name], grads_one[name], atol=tol * scale, err_msg=f"d{name}")


def torch_meteora(x, w, gate, a_list, b_list, scales, k, temperature):
    """docs/method.md in torch, a loop over adapters (torch layouts: A_i (r, in), B_i (out, r))."""
    z = x @ gate
    top_z, top_i = torch.topk(z, k, dim=-1)
    weights = torch.softmax(top_z / temperature, dim=-1)
    y = x @ w
    for i, (a, b, s) in enumerate(zip(a_list, b_list, scales, strict=True)):
        w_i = (weights * (top_i == i)).sum(-1, keepdim=True)
        y = y + w_i * s * ((x @ a.T) @ b.T)
    return y


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_op_matches_torch_loop_over_adapters(k, temperature):
    ranks = [4, 2, 8, 1, 4]
    args = random_layer(7, 23, 19, 13, ranks)
    y, _ = moe_lora(**args, settings=RoutingSettings(jnp.float32(temperature), top_k=k))
    t = {n: torch.tensor(np.asarray(v), dtype=torch.float64) for n, v in args.items()}
    a_list = [t["a_ldr"][i, :, :r].T for i, r in enumerate(ranks)]
    b_list = [t["b_lro"][i, :r, :].T for i, r in enumerate(ranks)]
    y_ref = torch_meteora(
        t["x_md"], t["kernel_do"], t["gate_dl"], a_list, b_list, t["scale_l"], k, temperature
    )
    assert np.abs(np.asarray(y) - y_ref.numpy()).max() <= 1e-5


def test_single_adapter_top1_is_plain_lora():
    args = random_layer(3, 11, 8, 6, [3])
    y, routing = moe_lora(**args, settings=RoutingSettings(jnp.float32(1.0), top_k=1))
    assert np.all(np.asarray(routing.weights) == 1.0)
    lora = args["x_md"] @ args["a_ldr"][0] @ args["b_lro"][0] * args["scale_l"][0]
    np.testing.assert_allclose(y, args["x_md"] @ args["kernel_do"] + lora, atol=1e-5)


def test_bfloat16_close_to_float32():
    f32 = random_layer(5, 64, 32, 48, [8, 8, 4, 8])
    b16 = {n: v.astype(jnp.bfloat16) if n != "scale_l" else v for n, v in f32.items()}
    routing = RoutingSettings(jnp.float32(1.0), top_k=2)
    y32, _ = moe_lora(**f32, settings=routing)
    y16, _ = moe_lora(**b16, settings=routing)
    assert y16.dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa: relative error ~2^-8 per rounding, a few roundings deep.
    assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) <= tolerance(jnp.bfloat16) * float(
        jnp.abs(y32).max()
    )


def test_temperature_does_not_recompile():
    args = random_layer(1, 9, 8, 8, [2, 2, 2])
    fn = jax.jit(lambda a, s: moe_lora(**a, settings=s)[0])
    for temperature in (1.0, 2.0, 30.0):
        fn(args, RoutingSettings(jnp.float32(temperature), top_k=2))
    assert fn._cache_size() == 1


def test_unknown_backend_is_refused():
    args = random_layer(1, 2, 3, 3, [1])
    with pytest.raises(ValueError, match="'nope'"):
        moe_lora(**args, settings=RoutingSettings(jnp.float32(1.0), top_k=1), backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing_case", ["one_adapter", "spread"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backends_on_concentrated_and_spread_routing(backend, routing_case, dtype):
    args = random_layer(11, 70, 24, 20, [8, 3, 8, 5, 1, 8, 2, 8, 4], dtype=dtype)
    if routing_case == "one_adapter":  # the usual MeteoRA case: one task, every token on adapter 3
        args["x_md"] = args["x_md"].at[:, 0].set(8.0)
        args["gate_dl"] = args["gate_dl"].at[0, 3].set(100.0)
    settings_ = RoutingSettings(jnp.float32(1.0), top_k=2)
    y, r = moe_lora(**args, settings=settings_, backend=backend)
    y_ref, r_ref = moe_lora_reference(**args, settings=settings_)
    if routing_case == "one_adapter":
        assert np.all(np.asarray(r.ids)[:, 0] == 3)
    else:
        assert len(np.unique(np.asarray(r.ids))) == 9
    assert y.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(y_ref),
        atol=tolerance(dtype) * (1 + float(jnp.abs(y_ref).max())),
    )


@pytest.mark.parametrize(
    ("platform", "tokens", "adapters", "rank", "expected"),
    [
        ("cpu", 512, 28, 8, "xla_grouped"),
        ("cpu", 512, 6, 8, "xla"),
        ("cpu", 512, 64, 64, "xla_grouped"),
        ("cpu", 1, 28, 8, "xla_pairs"),
        ("cpu", 8, 28, 8, "xla_pairs"),
        ("cpu", 1, 64, 64, "xla_pairs"),
        ("cpu", 4, 64, 64, "xla_pairs"),
        ("cpu", 8, 64, 64, "xla_grouped"),  # 16 pairs at rank 64: grouped tiles win
        ("gpu", 512, 64, 64, "xla"),
        ("gpu", 1, 64, 64, "xla_gather"),
        ("tpu", 8, 64, 64, "xla_gather"),
    ],
)
def test_auto_backend_by_platform(platform, tokens, adapters, rank, expected):
    """ragged_dot is a masked dense matmul on CPU and GPU (L times the work), so "auto" never
    picks it there; TPU decode reads only the chosen adapters."""
    assert choose_backend(tokens, 2, adapters, 4096, 4096, rank, platform) == expected


def test_auto_tpu_prefill_without_a_tpu_to_compile_for_says_so():
    """TPU prefill is chosen by compiled cost (tests/test_tpu_compile.py), which needs a TPU device."""
    with pytest.raises(ValueError, match="needs a TPU device to compile for, found cpu"):
        choose_backend(512, 2, 64, 4096, 4096, 64, "tpu")


@pytest.mark.parametrize(
    ("d_in", "d_out", "adapters", "rank", "expected"),
    [
        (128, 128, 6, 8, "xla"),  # 48 columns
        (512, 512, 8, 8, "xla"),  # 64 columns: the last that stays dense
        (512, 512, 12, 8, "xla_grouped"),
        (128, 128, 28, 8, "xla_grouped"),
        (4096, 4096, 28, 8, "xla_grouped"),
        (8192, 8192, 64, 64, "xla_grouped"),
        (14336, 4096, 28, 8, "xla_grouped"),
    ],
)
def test_auto_backend_on_cpu_prefill_is_dense_for_a_few_adapters_only(d_in, d_out, adapters, rank, expected):
    """On CPU, 512-token prefill stays dense while L*R <= 64 at any width: beyond, the grouped
    chunks cost less (docs/backends.md)."""
    assert choose_backend(512, 2, adapters, d_in, d_out, rank, "cpu") == expected


@pytest.mark.parametrize(
    ("tokens", "d", "adapters", "rank", "expected"),
    [
        (16, 512, 28, 8, "xla"),  # 32 pairs for 28 adapters: too few to pay for grouped loop steps
        (32, 4096, 28, 8, "xla"),
        (64, 512, 28, 8, "xla_grouped"),  # 128 pairs: 4.6 an adapter
        (16, 4096, 64, 64, "xla_grouped"),  # few tokens, but dense would be 2x the projection's work
    ],
)
def test_auto_backend_on_cpu_keeps_few_tokens_dense_while_dense_is_cheap(tokens, d, adapters, rank, expected):
    assert choose_backend(tokens, 2, adapters, d, d, rank, "cpu") == expected


@pytest.mark.parametrize(
    ("tokens", "rank", "expected"), [(1, 8, "xla_gather"), (8, 8, "xla_gather"), (1, 64, "xla_pairs")]
)
def test_auto_decode_on_a_narrow_model_gathers_small_ranks(tokens, rank, expected):
    """At hidden 512 a rank-8 adapter (8 x 1024 floats) is too small to pay for a pair-loop step."""
    assert choose_backend(tokens, 2, 28, 512, 512, rank, "cpu") == expected


def test_choice_noise_draws_the_top_k_and_keeps_the_clean_weights():
    """Gumbel noise of scale 1 on logits log(p) makes the top-1 choice a draw from p (40 000
    tokens: each share within 0.01 of p, 4 standard deviations); at top-2 the weights stay the
    softmax of the chosen adapters' clean logits; zero noise chooses as no noise does."""
    p = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    m = 40_000
    x_md, gate_dl = jnp.ones((m, 1)), jnp.log(jnp.asarray(p))[None, :]
    noise = jax.random.gumbel(jax.random.key(0), (m, 4))
    top1 = route(x_md, gate_dl, RoutingSettings(jnp.float32(1.0), top_k=1), choice_noise_ml=noise)
    shares = np.bincount(np.asarray(top1.ids[:, 0]), minlength=4) / m
    assert np.max(np.abs(shares - p)) <= 0.01, shares
    assert np.all(np.asarray(top1.weights) == 1)
    settings = RoutingSettings(jnp.float32(1.0), top_k=2)
    top2 = route(x_md, gate_dl, settings, choice_noise_ml=noise)
    ids = np.asarray(top2.ids)
    assert len({tuple(row) for row in ids}) > 6  # the pairs vary from token to token
    chosen = p[ids]
    np.testing.assert_allclose(np.asarray(top2.weights), chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
    plain, zero = route(x_md, gate_dl, settings), route(x_md, gate_dl, settings, choice_noise_ml=0 * noise)
    assert np.array_equal(plain.ids, zero.ids) and np.array_equal(plain.weights, zero.weights)
