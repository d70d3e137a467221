"""Sharding on 8 simulated CPU devices: the rules table, and a model loaded under a mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import meteora_jax as mj
from meteora_jax.sharding import LOGICAL_RULES, logical_to_spec, make_mesh

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test sets it)",
)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    config = mj.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    path = str(tmp_path_factory.mktemp("sharding") / "tiny")
    mj.save_llama(mj.LlamaForCausalLM(config, rngs=nnx.Rngs(3)), path)
    return path


def test_rules_map_logical_axes_to_mesh_axes(mesh):
    assert logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == P(None, "fsdp", "tensor")
    # fsdp is taken by the batch, so the embed dimension of activations stays whole.
    assert logical_to_spec(("batch", "length", "embed"), (4, 7, 64), mesh) == P(("data", "fsdp"), None, None)


def test_rules_drop_axes_that_do_not_divide_or_repeat(mesh):
    # 7 is not divisible by fsdp=2: replicated instead of failing.
    assert logical_to_spec(("embed", "mlp"), (7, 96), mesh) == P(None, "tensor")
    # batch 2 fits data but not data*fsdp.
    assert logical_to_spec(("batch", "length"), (2, 5), mesh) == P("data", None)
    # a mesh axis is used at most once per array.
    assert logical_to_spec(("heads", "mlp"), (4, 4), mesh) == P("tensor", None)


def test_the_parameter_fallback_gives_fsdp_to_a_dimension_without_embed(mesh):
    fallback = {"heads": ("fsdp",), "mlp": ("fsdp",)}
    # a LoRA B (adapters, rank, out): the output takes tensor, then fsdp
    assert logical_to_spec(("adapters", "lora_rank", "mlp"), (3, 2, 96), mesh, fallback=fallback) == P(
        None, None, ("tensor", "fsdp")
    )
    # embed took fsdp already: a kernel is as the rules say
    assert logical_to_spec(("heads", "embed"), (64, 64), mesh, fallback=fallback) == P("tensor", "fsdp")
    # the first dimension it divides takes it, once
    assert logical_to_spec(("heads", "mlp"), (2, 4), mesh, fallback=fallback) == P("tensor", "fsdp")
    assert logical_to_spec(("mlp", "heads"), (4, 4), mesh, fallback=fallback) == P(("tensor", "fsdp"), None)


def test_rules_reject_unknown_logical_axis(mesh):
    with pytest.raises(ValueError, match="'experts'"):
        logical_to_spec(("experts",), (4,), mesh)
    assert "adapters" in LOGICAL_RULES and "lora_rank" in LOGICAL_RULES


def test_make_mesh_sizes():
    assert dict(make_mesh(fsdp=-1, tensor=4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match="need 16 devices"):
        make_mesh(data=2, fsdp=2, tensor=4)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_load_under_mesh_shards_parameters_and_matches_single_device(mesh, tiny_dir):
    ids = np.random.default_rng(0).integers(0, 128, (4, 9))
    reference = np.asarray(mj.load_model(tiny_dir)(ids).logits)
    with jax.set_mesh(mesh):
        model = mj.load_model(tiny_dir)
        state = nnx.state(model.module, nnx.Param)
        specs = {
            "/".join(map(str, path)): var.get_value().sharding.spec for path, var in nnx.to_flat_state(state)
        }
        assert specs["layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
        assert specs["layers/self_attn/o_proj/kernel"] == P(None, "tensor", "fsdp")
        assert specs["layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
        assert specs["embed_tokens"] == P("tensor", "fsdp")
        assert specs["lm_head/kernel"] == P("fsdp", "tensor")
        assert specs["norm/scale"] == P(None)
        logits = model(ids).logits
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5)


def test_attention_in_query_blocks_under_mesh_matches_single_device(mesh, tiny_dir):
    """600 tokens: XLA attends in two query blocks (XLA_QUERY_BLOCK), inside the layer scan, with
    batch, heads and weights sharded; the logits equal one device's."""
    ids = np.random.default_rng(1).integers(0, 128, (2, 600))
    reference = np.asarray(mj.load_model(tiny_dir)(ids).logits)
    with jax.set_mesh(mesh):
        logits = mj.load_model(tiny_dir)(ids).logits
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5)


def test_explicit_mesh_argument(mesh, tiny_dir):
    model = mj.load_model(tiny_dir, mesh=mesh)
    kernel = nnx.state(model.module, nnx.Param)["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8


def test_meteora_model_under_mesh(mesh, tiny_dir, tmp_path):
    from meteora_jax.config import projection_shape
    from meteora_jax.io.peft import LoRAAdapter, LoRAModule
    from meteora_jax.io.peft_write import write_adapter

    config = mj.LlamaConfig.from_hf(tiny_dir)
    rng = np.random.default_rng(0)
    folders = {}
    for name, rank in (("a", 4), ("b", 8)):
        modules = {}
        for layer in range(config.num_hidden_layers):
            for proj in ("q_proj", "down_proj"):
                d_in, d_out = projection_shape(config, proj)
                a, b = rng.normal(size=(rank, d_in)) * 0.1, rng.normal(size=(d_out, rank)) * 0.1
                modules[(layer, proj)] = LoRAModule.from_alpha(a, b, 2.0 * rank)
        folders[name] = str(tmp_path / name)
        write_adapter(LoRAAdapter(name, modules), folders[name], config=config)
    ids = np.random.default_rng(1).integers(0, 128, (4, 9))
    with pytest.warns(UserWarning):
        reference = mj.load_model(tiny_dir, adapters=folders)(ids, return_routing=True)
    with jax.set_mesh(mesh), pytest.warns(UserWarning):
        model = mj.load_model(tiny_dir, adapters=folders)
        down = model.module.layers.mlp.down_proj
        # in=mlp takes tensor by the rules, and fsdp (unused) by PARAMETER_FALLBACK
        assert down.lora_a[...].sharding.spec == P(None, None, ("tensor", "fsdp"), None)  # (Y, L, in=mlp, R)
        assert down.lora_b[...].sharding.spec == P(None, None, None, "fsdp")  # (Y, L, R, out=embed)
        assert down.gate[...].sharding.spec == P(None, ("tensor", "fsdp"), None)  # (Y, in=mlp, L)
        q = model.module.layers.self_attn.q_proj
        assert q.lora_b[...].sharding.spec == P(None, None, None, ("tensor", "fsdp"))  # (Y, L, R, out=heads)
        assert q.kernel[...].sharding.spec == P(None, "fsdp", "tensor")  # kernels: the rules alone
        out = model(ids, return_routing=True)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(reference.logits), atol=1e-5)
    np.testing.assert_array_equal(
        out.routing["layers.1.q_proj"].ids, reference.routing["layers.1.q_proj"].ids
    )
