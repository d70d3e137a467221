"""One program compiled for a TPU topology: the request as the command states it, checked, then
lowered on the topology's devices, compiled by the TPU compiler and reported."""

from __future__ import annotations

import dataclasses
import re

import jax

from meteora_jax.aot.analysis import Report, captured_stderr, make_report, program_cost
from meteora_jax.aot.models import model_config
from meteora_jax.aot.programs import PROGRAMS, ProgramSpec, lower
from meteora_jax.aot.topology import Topology, parse_topology
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.sharding import make_mesh, parse_mesh
from meteora_jax.training.train_config import TrainConfig

_ADAPTERS = re.compile(r"^(\d+)x(\d+)$")


@dataclasses.dataclass(frozen=True)
class CompileRequest:
    """A checked `meteora-jax compile` request."""

    topology: Topology
    spec: ProgramSpec
    mesh: dict[str, int]

    @classmethod
    def from_flags(
        cls, *, topology: str, slices: int, model: str, adapters: str, program: str, batch: int, seq_len: int,
        mesh: str, dtype: str, remat: str, backend: str, attention: str, train_adapters: bool, top_k: int,
        loss_chunk: int = TrainConfig.loss_chunk,
    ) -> CompileRequest:  # fmt: skip
        """Raises ConfigError naming the flag at fault."""
        if program not in PROGRAMS:
            raise ConfigError(f"--program {program!r} is not one of {', '.join(PROGRAMS)}")
        match = _ADAPTERS.match(adapters)
        if match is None or min(int(match.group(1)), int(match.group(2))) < 1:
            raise ConfigError(f"--adapters {adapters!r}: expected LxR, e.g. 28x8 (28 adapters of rank 8)")
        for flag, value, low in (("--batch", batch, 1), ("--seq-len", seq_len, 2)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
        count, rank = int(match.group(1)), int(match.group(2))
        train = TrainConfig(
            steps=1, dtype=dtype, remat=remat, train_adapters=train_adapters, top_k=min(top_k, count),
            loss_chunk=loss_chunk,
        )  # fmt: skip
        spec = ProgramSpec(
            config=model_config(model), program=program, batch=batch, seq_len=seq_len, adapters=count,
            rank=rank, train=train, backend=backend, attention=attention,
        )  # fmt: skip
        return cls(parse_topology(topology, slices), spec, parse_mesh(mesh))


def compile_program(request: CompileRequest) -> Report:
    """Lowers and compiles the request's program on its topology's devices; its Report.

    Memory comes from the program as it runs (scanned layers). XLA's cost analysis and the HLO
    text count a loop's body once, so FLOPs, bytes and collectives come from the same program with
    one and two unrolled layers: one layer's cost is their difference, and L layers cost the first
    plus L - 1 times that.
    """
    devices = request.topology.devices()
    try:
        mesh = make_mesh(**request.mesh, devices=devices)
    except ValueError as e:
        raise ConfigError(f"--mesh: {e}") from None
    spec = request.spec
    built = lower(spec, mesh)
    with captured_stderr() as log:
        compiled = _compile(built, request)
    costs = []
    for layers in (1, 2):
        config = dataclasses.replace(spec.config, num_hidden_layers=layers)
        small = lower(dataclasses.replace(spec, config=config, scan_layers=False), mesh)
        with captured_stderr() as small_log:
            costs.append(program_cost(_compile(small, request)))
        log += small_log
    cost = extrapolate_layers(costs[0], costs[1], spec.config.num_hidden_layers)
    return make_report(
        compiled, cost, program=spec.program, topology=request.topology, mesh=mesh,
        tokens_per_step=built.tokens_per_step, weights=built.weights, stderr=log,
    )  # fmt: skip


class DoesNotFit(MeteoRAError):
    """The TPU compiler found the program larger than a chip's memory."""


def _compile(built, request: CompileRequest):
    """Compiles; the compiler's out-of-memory refusal becomes DoesNotFit naming the request."""
    try:
        return built.lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        spec = request.spec
        detail = text.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        raise DoesNotFit(
            f"{spec.program} at --batch {spec.batch} --seq-len {spec.seq_len} DOES NOT FIT on "
            f"{request.topology.name}: {detail}"
        ) from None


def extrapolate_layers(one: dict, two: dict, layers: int) -> dict:
    """Every number of the (nested) cost dicts for `layers` layers, from those of the same program
    with one and two layers: the first plus `layers` - 1 times the difference."""
    out = {}
    for key in sorted(one.keys() | two.keys()):
        a, b = one.get(key, 0), two.get(key, 0)
        if isinstance(a, dict) or isinstance(b, dict):
            out[key] = extrapolate_layers(a or {}, b or {}, layers)
        else:
            out[key] = a + (layers - 1) * (b - a)
    return out
