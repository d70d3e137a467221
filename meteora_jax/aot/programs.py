"""The programs a pod runs, built with abstract weights and lowered for a mesh of any devices.

Each program is the one the commands run: the training step of `make_train_step` over the split
of `split_for_training` (train-gate, train-lora), and generation's `prefill_program` /
`step_program` (prefill, decode). `forward-backward` is the yardstick of the gates' own cost: the
same model and loss as train-gate, differentiated only to the norms' scales (so back through every
layer's activations), with no gate statistics and no optimizer. Weights are
`jax.ShapeDtypeStruct`s made by `jax.eval_shape` of the model's constructor, so nothing is read
or allocated; each carries the sharding the logical rules give it on the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meteora_jax.config import PROJECTIONS, LlamaConfig, MoELoRAConfig
from meteora_jax.data.pipeline import BATCH_KEYS
from meteora_jax.generation import GenerationPlan, SamplingArrays, prefill_program, step_program
from meteora_jax.modeling.attention import DEFAULT_ATTENTION
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND
from meteora_jax.ops.routing import RoutingSettings
from meteora_jax.training.adapters import lora_train_config
from meteora_jax.training.state import shardings_of, split_for_training
from meteora_jax.training.step import batch_sharding, make_gradients, make_train_step
from meteora_jax.training.train_config import TrainConfig

PROGRAMS = ("train-gate", "train-lora", "prefill", "decode", "forward-backward")


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One program to compile: the model and mixture, the program and its shapes.

    `batch` rows of `seq_len` tokens (training, prefill) or decode at `batch` rows over a cache
    of `seq_len` slots. `adapters` x `rank` adapters on every projection (train-lora: one new
    adapter of `rank`). `train` holds the training settings (dtype, remat, what trains)."""

    config: LlamaConfig
    program: str
    batch: int
    seq_len: int
    adapters: int
    rank: int
    train: TrainConfig
    backend: str = DEFAULT_BACKEND
    attention: str = DEFAULT_ATTENTION
    scan_layers: bool = True


def _moe(spec: ProgramSpec) -> MoELoRAConfig:
    count = 1 if spec.program == "train-lora" else spec.adapters
    top_k = 1 if spec.program == "train-lora" else min(spec.train.top_k, count)
    names = tuple(f"adapter_{i}" for i in range(count))
    return MoELoRAConfig(adapter_names=names, targets=PROJECTIONS, rank=spec.rank, top_k=top_k)


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the matching leaves of `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_config(spec: ProgramSpec) -> TrainConfig:
    """The settings the program trains with (train-lora: `lora_train_config`'s fixed ones)."""
    if spec.program != "train-lora":
        return spec.train
    keep = {f: getattr(spec.train, f) for f in ("steps", "dtype", "remat", "grad_accum", "seed")}
    return lora_train_config(**keep)


@dataclasses.dataclass(frozen=True)
class Lowered:
    """A lowered program and the abstract weights it takes (for the sharding checks)."""

    lowered: jax.stages.Lowered
    weights: nnx.State
    tokens_per_step: int


def lower(spec: ProgramSpec, mesh: Mesh) -> Lowered:
    """The program of `spec` lowered for `mesh` (any devices: a TPU topology's included)."""
    if spec.program not in PROGRAMS:
        raise ValueError(f"program {spec.program!r} is not one of {PROGRAMS}")
    moe = _moe(spec)
    cfg = train_config(spec)
    compute = jnp.dtype(cfg.dtype)

    def build(param_dtype=jnp.float32):
        return LlamaForCausalLM(
            spec.config, moe, dtype=compute, param_dtype=param_dtype, backend=spec.backend,
            attention=spec.attention, scan_layers=spec.scan_layers, rngs=nnx.Rngs(0),
        )  # fmt: skip

    with jax.set_mesh(mesh):
        if spec.program == "forward-backward":
            return _lower_forward_backward(spec, cfg, build, mesh)
        if spec.program in ("train-gate", "train-lora"):
            return _lower_train(spec, cfg, build, mesh)
        return _lower_generation(spec, compute, build, mesh)


def _training_inputs(spec: ProgramSpec, mesh: Mesh) -> tuple[dict, jax.ShapeDtypeStruct]:
    """The abstract batch (rows split over the batch axes) and dropout key of a training step."""
    shape = (spec.batch, spec.seq_len)
    rows = batch_sharding(mesh, shape)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in BATCH_KEYS}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return batch, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _lower_train(spec: ProgramSpec, cfg: TrainConfig, build, mesh: Mesh) -> Lowered:
    static = {}

    def split():
        parts, state, frozen = split_for_training(build(), cfg)
        static["parts"] = parts  # graph definitions: static, kept outside the traced values
        return state, frozen

    state, frozen = jax.eval_shape(split)
    step = make_train_step(static["parts"], cfg, state, frozen, mesh, batch_shape=(spec.batch, spec.seq_len))
    batch, key = _training_inputs(spec, mesh)
    lowered = step.fn.lower(
        _abstract(frozen, step.frozen_shardings), _abstract(state, step.state_shardings), batch, key
    )
    weights = nnx.merge_state(frozen, state.params)
    return Lowered(lowered, weights, spec.batch * spec.seq_len)


def norm_scales(path, value) -> bool:
    """The RMS norms' scales: the parameters the forward-backward yardstick differentiates."""
    return type(value) is nnx.Param and path[-1] == "scale"  # adapters' scales are `AdapterScale`s


def _lower_forward_backward(spec: ProgramSpec, cfg: TrainConfig, build, mesh: Mesh) -> Lowered:
    plain = dataclasses.replace(cfg, gate_loss_weight=0.0)
    static = {}

    def split():
        parts, state, frozen = split_for_training(build(), plain, trainable=norm_scales)
        static["parts"] = parts
        return state.params, frozen

    params, frozen = jax.eval_shape(split)
    batch, key = _training_inputs(spec, mesh)
    gradients = make_gradients(static["parts"], plain)
    params_sh, frozen_sh = shardings_of(params, mesh), shardings_of(frozen, mesh)
    fn = jax.jit(
        lambda p, f, b, k: gradients(p, f, b, k)[0],
        in_shardings=(params_sh, frozen_sh, {k: b.sharding for k, b in batch.items()}, key.sharding),
        out_shardings=params_sh,
    )
    lowered = fn.lower(_abstract(params, params_sh), _abstract(frozen, frozen_sh), batch, key)
    return Lowered(lowered, nnx.merge_state(frozen, params), spec.batch * spec.seq_len)


def _lower_generation(spec: ProgramSpec, compute, build, mesh: Mesh) -> Lowered:
    def split():
        graphdef, params = nnx.split(build(compute))  # served weights are stored in the compute dtype
        static["graphdef"] = graphdef
        return params

    static = {}
    weights = jax.eval_shape(split)
    params = _abstract(weights, shardings_of(weights, mesh))
    graphdef = static["graphdef"]
    replicated = NamedSharding(mesh, PartitionSpec())

    def scalar(dtype, shape=()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    sampling = SamplingArrays(
        temperature=scalar(jnp.float32), top_p=scalar(jnp.float32), seed=scalar(jnp.uint32),
        eos_e=scalar(jnp.int32, (1,)), pad=scalar(jnp.int32),
    )  # fmt: skip
    routing = RoutingSettings(scalar(jnp.float32), top_k=min(spec.train.top_k, spec.adapters))
    rows = batch_sharding(mesh, (spec.batch, 1))
    plan = GenerationPlan(max_new_tokens=1, return_routing=False, output_logits=False)
    if spec.program == "prefill":
        prompt = jax.ShapeDtypeStruct((spec.batch, spec.seq_len), jnp.int32, sharding=rows)
        lowered = prefill_program.lower(graphdef, params, prompt, prompt, sampling, routing, plan)
        return Lowered(lowered, weights, spec.batch * spec.seq_len)
    # decode: one step over a cache of seq_len slots, its state as the prefill program leaves it
    prompt = jax.ShapeDtypeStruct((spec.batch, spec.seq_len - 1), jnp.int32, sharding=rows)
    prefill = prefill_program.lower(graphdef, params, prompt, prompt, sampling, routing, plan).compile()
    state = _abstract(prefill.out_info, prefill.output_shardings)
    return Lowered(step_program.lower(graphdef, params, state, sampling, routing, plan), weights, spec.batch)
