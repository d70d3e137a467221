"""The parts of `meteora-jax compile` that need no TPU compiler: topology names, model presets,
request checks, the HLO collective count, the layer extrapolation and the unsplit-weight check."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from meteora_jax.aot.analysis import REMAT_WARNING, Report, captured_stderr, collectives, unsplit_weights
from meteora_jax.aot.compiler import CompileRequest, extrapolate_layers
from meteora_jax.aot.models import MODELS, model_config
from meteora_jax.aot.programs import ProgramSpec, lower, norm_scales
from meteora_jax.aot.topology import parse_topology
from meteora_jax.chips import CHIPS, device_of
from meteora_jax.config import PROJECTIONS, LlamaConfig, MoELoRAConfig
from meteora_jax.data.pipeline import BATCH_KEYS
from meteora_jax.errors import ConfigError
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.sharding import make_mesh
from meteora_jax.training.state import split_for_training
from meteora_jax.training.train_config import TrainConfig


@pytest.mark.parametrize(
    ("text", "name", "chips"),
    [
        ("v5e-8", "v5e:2x4", 8),
        ("v6e-256", "v6e:16x16", 256),
        ("v5p-64", "v5p:2x4x4", 32),  # Cloud counts v5p TensorCores, two a chip
        ("v5p:4x4x4", "v5p:4x4x4", 64),
        ("v5e:4x4", "v5e:4x4", 16),
    ],
)
def test_topology_names(text, name, chips):
    topology = parse_topology(text)
    assert (topology.name, topology.chips) == (name, chips)
    assert parse_topology(text, slices=2).chips == 2 * chips


@pytest.mark.parametrize(
    ("text", "slices", "fault"),
    [
        ("v9x-8", 1, "unknown TPU generation 'v9x'"),
        ("v5e-12", 1, "not a slice size"),
        ("v5p-7", 1, "not a slice size"),
        ("v5e:4x4x4", 1, "2D torus"),
        ("tpu", 1, "expected a name like"),
        ("v5e-8", 0, "--slices"),
    ],
)
def test_bad_topologies_name_the_setting(text, slices, fault):
    with pytest.raises(ConfigError, match="--topology|--slices") as e:
        parse_topology(text, slices)
    assert fault in str(e.value)


def test_chip_table_is_complete():
    for chip in CHIPS.values():
        assert chip.hbm_bytes > 0 and chip.flops > 1e14 and chip.bandwidth > 1e11 and chip.dims in (2, 3)


def test_model_presets_are_the_published_shapes(tmp_path):
    eight = model_config("llama3-8b")
    assert (eight.hidden_size, eight.num_hidden_layers, eight.num_key_value_heads, eight.vocab_size) == (
        4096, 32, 8, 128256,
    )  # fmt: skip
    assert model_config("llama3.2-1b").tie_word_embeddings and len(MODELS) == 4
    path = tmp_path / "config.json"
    fields = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48}
    fields |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    path.write_text(json.dumps(fields))
    assert model_config(str(path)).hidden_size == 32
    with pytest.raises(ConfigError, match="--model 'llama9'"):
        model_config("llama9")


def _request(**changes):
    flags = dict(
        topology="v5e:2x2", slices=1, model="llama3.2-1b", adapters="28x8", program="train-gate", batch=8,
        seq_len=256, mesh="data=1,fsdp=-1,tensor=1", dtype="bfloat16", remat="full", backend="auto",
        attention="auto", train_adapters=False, top_k=2,
    )  # fmt: skip
    return CompileRequest.from_flags(**{**flags, **changes})


def test_requests_are_checked_flag_by_flag():
    request = _request()
    assert (request.spec.adapters, request.spec.rank, request.topology.chips) == (28, 8, 4)
    for changes, flag in (
        ({"adapters": "28"}, "--adapters"),
        ({"adapters": "0x8"}, "--adapters"),
        ({"batch": 0}, "--batch"),
        ({"seq_len": 1}, "--seq-len"),
        ({"mesh": "rows=4"}, "--mesh"),
        ({"program": "serve"}, "--program"),
        ({"topology": "v4-3"}, "--topology"),
    ):
        with pytest.raises(ConfigError, match=flag):
            _request(**changes)


HLO = """
  %all-gather.3 = bf16[4096,1024]{1,0} all-gather(bf16[1024,1024]{1,0} %p), dimensions={0}
  %all-reduce-start.1 = (f32[8]{0}, f32[2,4]{1,0}) all-reduce-start(f32[8]{0} %a, f32[2,4]{1,0} %b)
  %all-reduce-done.1 = (f32[8]{0}, f32[2,4]{1,0}) all-reduce-done(%all-reduce-start.1)
  %fusion.2 = f32[16]{0} fusion(f32[16]{0} %x), kind=kLoop, calls=%fused_computation
  %collective-permute.7 = s32[3]{0} collective-permute(s32[3]{0} %c), source_target_pairs={{0,1}}
%async_collective_fusion.1 (param_0: bf16[64,8]) -> bf16[64,64] {
  %all-gather.5 = bf16[64,64]{1,0} all-gather(%param_0), channel_id=41, dimensions={1}
}
%async_collective_fusion.2 (param_0: bf16[64,8]) -> bf16[64,64] {
  %all-gather.6 = bf16[64,64]{1,0} all-gather(%param_0), channel_id=41, dimensions={1}
}
  %all-gather.7 = bf16[32,32]{1,0} all-gather(%copy-done.2), channel_id=50, dimensions={1}
"""


def test_collectives_are_counted_with_their_result_bytes():
    """Each collective once: the TPU compiler's async pieces of one all-gather share its channel
    id, and an operand named "...-done" does not hide the op that reads it."""
    assert collectives(HLO) == {
        "all-gather": {"count": 3, "bytes": 4096 * 1024 * 2 + 64 * 64 * 2 + 32 * 32 * 2},
        "all-reduce": {"count": 1, "bytes": 8 * 4 + 8 * 4},
        "collective-permute": {"count": 1, "bytes": 12},
    }


def test_layer_costsextrapolate_layers_from_one_and_two_layers():
    one = {"flops": 10.0, "collectives": {"all-gather": {"count": 2, "bytes": 100}}}
    two = {
        "flops": 16.0,
        "collectives": {"all-gather": {"count": 3, "bytes": 150}, "all-reduce": {"count": 1}},
    }
    assert extrapolate_layers(one, two, 32) == {
        "flops": 10.0 + 31 * 6.0,
        "collectives": {"all-gather": {"count": 33, "bytes": 1650}, "all-reduce": {"count": 31}},
    }


def test_weights_the_rules_cannot_split_are_named():
    """The rules split the vocabulary over `tensor`; 60 rows do not divide 8 ways (they stay whole,
    and are named) but do divide 4 ways."""
    config = LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    weights = jax.eval_shape(lambda: nnx.state(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param))
    unsplit = unsplit_weights(weights, make_mesh(data=1, fsdp=1, tensor=8))
    assert [(u.path, u.shape, u.wanted, u.given) for u in unsplit] == [
        ("embed_tokens", (60, 32), (("tensor",), ()), ((), ())),
        ("lm_head.kernel", (32, 60), ((), ("tensor",)), ((), ())),
    ]
    assert unsplit_weights(weights, make_mesh(data=1, fsdp=1, tensor=4, devices=jax.devices()[:4])) == []


def test_a_lora_weight_whole_on_every_chip_is_named():
    """Under fsdp alone a LoRA B's output takes fsdp (it has no embed dimension); where fsdp does
    not divide it (k_proj's 2 x 6 = 12 outputs on 8 chips) the weight stays whole, and is named."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6,
    )  # fmt: skip
    moe = MoELoRAConfig(adapter_names=("a", "b", "c"), targets=PROJECTIONS, rank=2, top_k=2)
    weights = jax.eval_shape(lambda: nnx.state(LlamaForCausalLM(config, moe, rngs=nnx.Rngs(0))))
    unsplit = unsplit_weights(weights, make_mesh(data=1, fsdp=8, tensor=1))
    assert [(u.path, u.wanted, u.given) for u in unsplit] == [
        ("layers.self_attn.k_proj.lora_b", ((), (), (), ("fsdp",)), ((), (), (), ())),
        ("layers.self_attn.v_proj.lora_b", ((), (), (), ("fsdp",)), ((), (), (), ())),
    ]


def test_the_compilers_log_is_captured_and_a_remat_warning_is_a_problem():
    """Native code writes to file descriptor 2: it is collected, then the descriptor is restored."""
    before = os.fstat(2)
    with captured_stderr() as log:
        os.write(2, f"W spmd_partitioner.cc:1 {REMAT_WARNING} of %param.3 (bf16[4096,128])\n".encode())
        os.write(2, b"an unrelated line\n")
    assert log == [
        f"W spmd_partitioner.cc:1 {REMAT_WARNING} of %param.3 (bf16[4096,128])",
        "an unrelated line",
    ]
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # descriptor 2 is back
    figures = dict(argument_bytes=3, output_bytes=2, alias_bytes=2, temp_bytes=5, code_bytes=1, hbm_bytes=8)
    report = Report(
        program="decode", topology="v5e:2x2", chips=4, mesh={}, tokens_per_step=8, flops=1.0,
        bytes_accessed=1.0, step_seconds=0.5, bound="memory", collectives={}, unsplit=[],
        remat_warnings=log[:1], **figures,
    )  # fmt: skip
    assert report.total_bytes == 9 and not report.fits and report.tokens_per_second_per_chip == 4.0
    assert report.problems == [
        "DOES NOT FIT: 0.00 GiB a chip, 0.00 GiB of HBM",
        f"{REMAT_WARNING}: {log[0]}",
    ]
    fitting = dataclasses.replace(report, hbm_bytes=9, remat_warnings=[])
    assert fitting.fits and fitting.problems == []


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_without_libtpu_the_topology_says_how_to_install_it():
    with pytest.raises(
        ConfigError, match=r"--topology v5e:2x2: libtpu cannot describe it .*make tpu-compile"
    ):
        parse_topology("v5e-4").devices()


def test_the_forward_backward_yardstick_differentiates_the_norms_through_every_layer():
    """`--program forward-backward`: the train-gate model and loss, gradients of the norms' scales
    only (no gate, adapter or weight gradient), reaching the first layer's input."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    train = TrainConfig(steps=1, top_k=2)
    spec = ProgramSpec(
        config=config, program="forward-backward", batch=2, seq_len=16, adapters=4, rank=2, train=train
    )
    mesh = make_mesh(devices=jax.devices()[:1])
    built = lower(spec, mesh)
    moe = MoELoRAConfig(adapter_names=tuple("abcd"), targets=PROJECTIONS, rank=2, top_k=2)
    model = LlamaForCausalLM(config, moe, rngs=nnx.Rngs(0))
    _, state, frozen = split_for_training(model, train, trainable=norm_scales)
    rng = np.random.default_rng(0)
    batch = {k: np.zeros((2, 16), np.int32) for k in BATCH_KEYS}
    batch |= {
        "input_ids": rng.integers(0, 64, (2, 16), dtype=np.int32),
        "segment_ids": np.ones((2, 16), np.int32),
    }
    batch |= {
        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
        "lm_weights": np.ones((2, 16), np.int32),
    }
    batch["lm_targets"] = rng.integers(0, 64, (2, 16), dtype=np.int32)
    grads = built.lowered.compile()(state.params, frozen, batch, jax.random.key(0))
    flat = dict(nnx.to_flat_state(grads))
    names = {
        ("layers", "input_layernorm", "scale"),
        ("layers", "post_attention_layernorm", "scale"),
        ("norm", "scale"),
    }
    assert set(flat) == names
    first_layer = np.asarray(flat[("layers", "input_layernorm", "scale")][...])[0]
    assert np.isfinite(first_layer).all() and np.abs(first_layer).max() > 0


def test_a_tpu_kind_neither_here_nor_in_the_table_is_named():
    with pytest.raises(ValueError, match="no 'TPU v99' device here, and libtpu describes slices of TPU v4, "):
        device_of("TPU v99")
