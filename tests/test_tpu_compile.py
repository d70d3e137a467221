"""Programs compiled by the real TPU compiler for a v5e:2x2 slice from this CPU host (libtpu's
topology description; nothing runs). Skipped without libtpu: `make tpu-compile` installs it."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

pytest.importorskip(
    "libtpu", reason="TPU compile tests need libtpu: run `make tpu-compile` (the [tpu] extra)"
)

import pallas_kernels  # noqa: E402
from meteora_jax.aot.programs import ProgramSpec, lower  # noqa: E402
from meteora_jax.aot.topology import parse_topology  # noqa: E402
from meteora_jax.cli import main  # noqa: E402
from meteora_jax.config import LlamaConfig  # noqa: E402
from meteora_jax.modeling.attention import AttentionMask, attend  # noqa: E402
from meteora_jax.ops.routing import Routing  # noqa: E402
from meteora_jax.sharding import make_mesh, variable_sharding  # noqa: E402
from meteora_jax.training.train_config import TrainConfig  # noqa: E402

moe_lora = importlib.import_module("meteora_jax.ops.moe_lora")  # the package exports a function of that name

CONFIG = LlamaConfig(
    vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
    """TPU executables compiled without a TPU client cannot be read back from the on-disk cache."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.fixture(scope="module")
def devices():
    devices = parse_topology("v5e:2x2").devices()
    assert {d.platform for d in devices} == {"tpu"} and len(devices) == 4
    return devices


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh(data=1, fsdp=2, tensor=2, devices=devices)


@pytest.fixture(scope="module")
def chip(devices):
    """One chip: a kernel called on its own (the model wraps it in a shard_map over the mesh)."""
    return make_mesh(data=1, fsdp=1, tensor=1, devices=devices[:1])


def _spec(program, **changes):
    fields = dict(config=CONFIG, program=program, batch=8, seq_len=256, adapters=4, rank=8)
    return ProgramSpec(**{**fields, "train": TrainConfig(steps=1, dtype="bfloat16", remat="full"), **changes})


@pytest.mark.parametrize("tokens", [512, 4])  # a prefill's many tokens and a decode step's few
def test_the_pallas_op_and_its_gradient_compile_with_mosaic(chip, tokens):
    d, o, adapters, rank, k = 256, 512, 8, 8, 2
    x = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((adapters, d, rank), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((adapters, rank, o), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((tokens, k), jnp.int32)
    coef = jax.ShapeDtypeStruct((tokens, k), jnp.float32)

    def loss(x, a, b, ids, coef):
        return pallas_kernels.moe_lora_delta(x, a, b, ids, coef).astype(jnp.float32).sum()

    with jax.set_mesh(chip):
        forward = jax.jit(pallas_kernels.moe_lora_delta).lower(x, a, b, ids, coef)
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b, ids, coef)
    for lowered in (forward, backward):
        text = lowered.as_text()
        assert "tpu_custom_call" in text  # Mosaic kernels, not the interpreter's loops
        lowered.compile()


def test_splash_attention_compiles(chip):
    shape_q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    shape_kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def run(q, k, v, seg):
        return attend(q, k, v, AttentionMask(segment_ids_bt=seg, implementation="splash"))

    with jax.set_mesh(chip):
        lowered = jax.jit(run).lower(shape_q, shape_kv, shape_kv, segments)
    assert "tpu_custom_call" in lowered.as_text()
    lowered.compile()


@pytest.mark.parametrize(("adapters", "rank", "expected"), [(64, 64, "xla"), (256, 64, "ragged")])
def test_auto_runs_the_candidate_the_tpu_compiler_costs_less(chip, adapters, rank, expected):
    """LLaMA-3-8B's width, 8192 tokens a chip: dense stays cheaper up to 64 x r64 (the rule it
    replaced said ragged past 4096 / 16 adapter columns); 256 x r64 tips it to ragged."""
    shape = (8192, 2, adapters, 4096, 4096, rank)
    with jax.set_mesh(chip):
        costs = {
            b: moe_lora.tpu_seconds(b, moe_lora.tpu_kind(), *shape, "bfloat16")
            for b in moe_lora.TPU_CANDIDATES
        }
        chosen = moe_lora.choose_backend(*shape, dtype="bfloat16")
    assert costs["xla"] != costs["ragged"]
    assert chosen == min(costs, key=costs.get) == expected, costs


def test_auto_costs_the_tokens_of_one_device(mesh, monkeypatch):
    """Inside a trace under a (1, 2, 2) mesh the op's rows are split over data * fsdp = 2 devices:
    the candidates are costed at half the rows, and the op runs the cheaper one."""
    costed = []

    def recorded(backend, kind, tokens, *rest):
        costed.append((backend, kind, tokens))
        return {"xla": 2.0, "ragged": 1.0}[backend]  # ragged "cheaper": the traced op must follow

    monkeypatch.setattr(moe_lora, "tpu_seconds", recorded)
    x = jax.ShapeDtypeStruct((2048, 256), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((8, 256, 8), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((8, 8, 512), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2048, 2), jnp.int32)
    weights = jax.ShapeDtypeStruct((2048, 2), jnp.float32)
    scale = jax.ShapeDtypeStruct((8,), jnp.float32)

    def delta(x, a, b, ids, weights, scale):
        return moe_lora.lora_delta(x, a, b, Routing(ids=ids, weights=weights), scale, backend="auto")

    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(delta)(x, a, b, ids, weights, scale))
    assert costed == [("xla", "TPU v5 lite", 1024), ("ragged", "TPU v5 lite", 1024)]
    assert "ragged_dot" in text


def test_gate_training_step_compiles_with_the_rules_shardings(mesh):
    built = lower(_spec("train-gate"), mesh)
    compiled = built.lowered.compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    frozen_in, state_in = compiled.input_shardings[0][:2]
    # every frozen weight arrives split as the logical rules say
    for path, var in nnx.to_flat_state(built.weights):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        want = variable_sharding(var, mesh).spec
        held = dict(nnx.to_flat_state(frozen_in)) | dict(nnx.to_flat_state(state_in.params))
        got = held[path]
        got = got.get_value() if isinstance(got, nnx.Variable) else got
        assert isinstance(got, NamedSharding) and got.spec == want, (path, got, want)
    frozen_specs = {
        path: (s.get_value() if isinstance(s, nnx.Variable) else s).spec
        for path, s in nnx.to_flat_state(frozen_in)
    }
    assert frozen_specs[("embed_tokens",)] == PartitionSpec("tensor", "fsdp")
    # a LoRA B has no embed dimension: its output takes fsdp after tensor (PARAMETER_FALLBACK)
    lora_b = frozen_specs[("layers", "self_attn", "q_proj", "lora_b")]
    assert lora_b == PartitionSpec(None, None, None, ("tensor", "fsdp"))


@pytest.mark.parametrize("program", ["train-lora", "prefill", "decode", "forward-backward"])
def test_the_other_programs_compile(mesh, program):
    compiled = lower(_spec(program), mesh).lowered.compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def _compile(tmp_path, flags: str, **config_changes) -> int:
    """`meteora-jax compile` on v5e:2x2 for CONFIG (with `config_changes`), 4 adapters of rank 8."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG.to_hf_dict(), **config_changes}))
    argv = ["compile", "--topology", "v5e:2x2", "--model", str(config), "--adapters", "4x8"]
    return main(argv + flags.split())


def test_the_command_reports_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "report.json"
    flags = f"--program train-gate --batch 8 --seq-len 256 --mesh fsdp=2,tensor=2 --json {out}"
    assert _compile(tmp_path, flags) == 0
    printed = capsys.readouterr().out
    assert "FITS" in printed and "tokens/s per chip" in printed and "PROBLEM" not in printed
    report = json.loads(out.read_text())
    assert report["fits"] and report["chips"] == 4 and report["flops"] > 0 and report["problems"] == []
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}


def test_the_command_fails_on_a_weight_left_whole(tmp_path, capsys):
    """A vocabulary the tensor axis cannot split: the report names the weights, exit 2."""
    flags = "--program decode --batch 4 --seq-len 64 --mesh fsdp=2,tensor=2"
    assert _compile(tmp_path, flags, vocab_size=255) == 2
    captured = capsys.readouterr()
    assert "PROBLEM: weight embed_tokens (255, 256) stays unsplit" in captured.out
    assert "problem(s) a pod run would regret" in captured.err


def test_a_program_larger_than_the_chips_is_one_line_saying_so(tmp_path, capsys):
    """Float32 logits of 256 x 4096 tokens over 32000 words, whole (--loss-chunk 0), are 134 GB:
    the compiler refuses."""
    flags = "--program train-gate --batch 256 --seq-len 4096 --mesh fsdp=4 --loss-chunk 0"
    assert _compile(tmp_path, flags, vocab_size=32000) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("meteora-jax compile: error: train-gate at --batch 256 --seq-len 4096 DOES NOT FIT")
    assert "v5e:2x2" in err and "HBM" in err


def test_a_mesh_the_slice_cannot_hold_names_the_flag(tmp_path, capsys):
    assert _compile(tmp_path, "--program decode --batch 4 --seq-len 64 --mesh data=3,fsdp=1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("meteora-jax compile: error: --mesh:") and "need 3 devices, found 4" in err
