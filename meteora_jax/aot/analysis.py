"""What a compiled program tells about a pod run: per-chip memory against the chip's HBM, XLA's
FLOPs and bytes, a roofline step time, the collectives in the program, and the problems a pod
run would regret (a weight the sharding rules meant to split left whole, an involuntary full
rematerialization in the SPMD partitioner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterator

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meteora_jax.aot.topology import Topology
from meteora_jax.chips import xla_counts
from meteora_jax.sharding import LOGICAL_RULES, PARAMETER_FALLBACK, variable_sharding

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
REMAT_WARNING = "Involuntary full rematerialization"
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}
_BYTES |= {"f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collects what native code (XLA's C++ logging) writes to file descriptor 2 meanwhile; the
    text is in the yielded list afterwards, and is written back to stderr."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines.extend(text.splitlines())


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an HLO module's text; bytes are those of
    each op's result. An op inside a loop counts once, as written, and so does one collective that
    the TPU compiler writes into several computations (its async pieces share one channel id)."""
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    channels = set()
    for line in hlo_text.splitlines():
        match = _OP.search(line)  # an "-done" op is no match: its start was counted
        if match is None:
            continue
        channel = _CHANNEL.search(line)
        if channel is not None:
            if channel.group(1) in channels:
                continue
            channels.add(channel.group(1))
        result, kind = match.groups()
        size = 0
        for dtype, dims in _ARRAY.findall(result):
            if dtype in _BYTES:
                size += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        found[kind]["count"] += 1
        found[kind]["bytes"] += size
    return {k: v for k, v in found.items() if v["count"]}


@dataclasses.dataclass(frozen=True)
class Unsplit:
    """A weight left less split than the rules ask: its path, shape, wanted and given specs."""

    path: str
    shape: tuple[int, ...]
    wanted: tuple
    given: tuple


def unsplit_weights(state: nnx.State, mesh: Mesh) -> list[Unsplit]:
    """Weights left without a mesh axis of size > 1 that their rules (or the parameters' fsdp
    fallback) name: a dimension it does not divide. Replicated where a pod run expects them split."""
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        shape = tuple(var.get_value().shape)
        wanted = tuple(
            tuple(
                a
                for a in (LOGICAL_RULES.get(name) or ()) + PARAMETER_FALLBACK.get(name, ())
                if mesh.shape.get(a, 1) > 1
            )
            if name
            else ()
            for name in axes
        )
        given = tuple(variable_sharding(var, mesh).spec) + (None,) * len(shape)
        given = tuple(
            () if g is None else (g,) if isinstance(g, str) else tuple(g) for g in given[: len(shape)]
        )
        if {a for dim in wanted for a in dim} - {a for dim in given for a in dim}:
            out.append(Unsplit(".".join(map(str, path)), shape, wanted, given))
    return out


@dataclasses.dataclass(frozen=True)
class Report:
    """The figures of one compiled program on one topology (bytes and FLOPs per chip)."""

    program: str
    topology: str
    chips: int
    mesh: dict
    tokens_per_step: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float
    bytes_accessed: float
    step_seconds: float
    bound: str  # "compute" | "memory"
    collectives: dict
    unsplit: list
    remat_warnings: list

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def tokens_per_second_per_chip(self) -> float:
        return self.tokens_per_step / self.step_seconds / self.chips if self.step_seconds > 0 else 0.0

    @property
    def problems(self) -> list[str]:
        found = (
            []
            if self.fits
            else [f"DOES NOT FIT: {_gib(self.total_bytes)} a chip, {_gib(self.hbm_bytes)} of HBM"]
        )
        found += [f"{REMAT_WARNING}: {line.strip()[:300]}" for line in self.remat_warnings]
        found += [
            f"weight {u.path} {u.shape} stays unsplit: rules {u.wanted}, spec {u.given}" for u in self.unsplit
        ]
        return found

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out |= {"total_bytes": self.total_bytes, "fits": self.fits, "problems": self.problems}
        out["tokens_per_second_per_chip"] = self.tokens_per_second_per_chip
        return out


def program_cost(compiled) -> dict:
    """{"flops", "bytes", "collectives"} of a compiled program as XLA counts them (per chip; a
    loop's body once)."""
    flops, moved = xla_counts(compiled)
    return {"flops": flops, "bytes": moved, "collectives": collectives(compiled.as_text())}


def make_report(
    compiled, cost: dict, *, program: str, topology: Topology, mesh: Mesh, tokens_per_step: int,
    weights: nnx.State, stderr: list[str],
) -> Report:  # fmt: skip
    """The Report of `compiled` (a `jax.stages.Compiled` for `topology`) with `cost` (FLOPs,
    bytes and collectives of the whole step, `program_cost`'s keys); `weights` (abstract) for the
    sharding check, `stderr` the compiler's log lines."""
    memory = compiled.memory_analysis()
    flops, moved = cost["flops"], cost["bytes"]
    chip = topology.chip
    compute_s = flops / chip.flops
    return Report(
        program=program,
        topology=f"{topology.name}" + (f" x {topology.slices} slices" if topology.slices > 1 else ""),
        chips=topology.chips,
        mesh=dict(mesh.shape),
        tokens_per_step=tokens_per_step,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_bytes=chip.hbm_bytes,
        flops=flops,
        bytes_accessed=moved,
        step_seconds=chip.roofline_seconds(flops, moved),
        bound="compute" if compute_s >= moved / chip.bandwidth else "memory",
        collectives=cost["collectives"],
        unsplit=unsplit_weights(weights, mesh),
        remat_warnings=[line for line in stderr if REMAT_WARNING in line],
    )


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def format_report(r: Report) -> str:
    """The report as the command prints it."""
    lines = [
        f"program {r.program} on {r.topology} ({r.chips} chips), mesh {r.mesh}",
        f"HBM per chip: arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)} "
        f"(aliased {_gib(r.alias_bytes)}), temporaries {_gib(r.temp_bytes)}, code {_gib(r.code_bytes)}",
        f"  total {_gib(r.total_bytes)} of {_gib(r.hbm_bytes)}: {'FITS' if r.fits else 'DOES NOT FIT'}",
        f"per chip and step: {r.flops / 1e12:.3f} TFLOP, {r.bytes_accessed / 1e9:.3f} GB moved",
        f"roofline: {r.step_seconds * 1e3:.2f} ms a step ({r.bound}-bound), "
        f"{r.tokens_per_second_per_chip:,.0f} tokens/s per chip",
    ]
    if r.collectives:
        parts = [f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in r.collectives.items()]
        lines.append("collectives per step: " + ", ".join(parts))
    else:
        lines.append("collectives: none")
    lines += [f"PROBLEM: {p}" for p in r.problems]
    return "\n".join(lines)
