"""`meteora-jax compile`: one program compiled for a TPU topology with abstract weights, and what
a pod would see (memory per chip, FLOPs, roofline, collectives, problems)."""

from __future__ import annotations

import argparse
import json

from meteora_jax.aot.models import MODELS
from meteora_jax.aot.programs import PROGRAMS
from meteora_jax.aot.topology import Topology
from meteora_jax.commands.flags import add_field_flags
from meteora_jax.errors import MeteoRAError
from meteora_jax.io.files import write_text_atomic
from meteora_jax.modeling.attention import DEFAULT_ATTENTION, IMPLEMENTATIONS
from meteora_jax.ops.moe_lora import BACKENDS, DEFAULT_BACKEND
from meteora_jax.sharding import DEFAULT_MESH
from meteora_jax.training.train_config import TrainConfig


class CompileProblems(MeteoRAError):
    """The program compiled with problems a pod run would regret (exit 2, after the report)."""


NAME = "compile"
HELP = "compile a program for a TPU topology from this host (needs the [tpu] extra)"
DESCRIPTION = (
    "Compile one program for a TPU topology with abstract weights (no files, nothing downloaded) and "
    "report what a pod would see: HBM per chip, FLOPs, a roofline step time and the collectives."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--topology", required=True, help="v5e-8, v5p-64, v6e-256 (Cloud names) or v5e:4x4, v5p:4x4x4"
    )
    p.add_argument(
        "--slices", type=int, default=Topology.slices, help="slices joined over the data-centre network"
    )
    p.add_argument(
        "--model", required=True, help=f"{' | '.join(MODELS)} | an HF config.json (file or folder)"
    )
    p.add_argument(
        "--adapters", default="28x8", metavar="LxR", help="L adapters of rank R on every projection"
    )
    p.add_argument("--program", required=True, choices=PROGRAMS)
    p.add_argument(
        "--batch", type=int, required=True, help="global rows (decode: sequences decoding at once)"
    )
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row (decode: the cache's slots)")
    p.add_argument(
        "--mesh",
        default=",".join(f"{axis}={size}" for axis, size in DEFAULT_MESH.items()),
        help="data=N,fsdp=N,tensor=N (-1: the rest)",
    )
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS, help="MoE-LoRA backend")
    p.add_argument(
        "--attention", default=DEFAULT_ATTENTION, choices=IMPLEMENTATIONS, help="attention implementation"
    )
    # a pod's training runs in bfloat16 with full remat: the defaults compiled unless told
    fields = ("dtype", "remat", "train_adapters", "top_k", "loss_chunk")
    add_field_flags(p, TrainConfig, fields, defaults={"dtype": "bfloat16", "remat": "full"})
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def run(args: argparse.Namespace) -> None:
    from meteora_jax.aot.analysis import format_report  # noqa: PLC0415
    from meteora_jax.aot.compiler import CompileRequest, compile_program  # noqa: PLC0415  (jax, libtpu)

    request = CompileRequest.from_flags(
        topology=args.topology, slices=args.slices, model=args.model, adapters=args.adapters,
        program=args.program, batch=args.batch, seq_len=args.seq_len, mesh=args.mesh, dtype=args.dtype,
        remat=args.remat, backend=args.backend, attention=args.attention,
        train_adapters=args.train_adapters, top_k=args.top_k, loss_chunk=args.loss_chunk,
    )  # fmt: skip
    report = compile_program(request)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    if report.problems:
        raise CompileProblems(f"{len(report.problems)} problem(s) a pod run would regret (above)")
