"""`meteora-jax convert`: PEFT adapters (and trained gates) over a base -> a meteora-jax checkpoint."""

from __future__ import annotations

import argparse
import sys

from meteora_jax.commands import adapter_specs, add_adapter_flag
from meteora_jax.io import checkpoint, files, gate_sources

NAME = "convert"
HELP = "fuse PEFT adapters (and trained gates) over a base into a meteora-jax checkpoint"
DESCRIPTION = (
    "Fuse PEFT adapters over a base model into a meteora-jax checkpoint, with trained gates (--gates) "
    "or seeded untrained ones."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the HF LLaMA base folder")
    add_adapter_flag(p, required=True, note="name: the folder's name unless NAME= is given")
    p.add_argument(
        "--gates",
        metavar="FILE|CKPT",
        help="trained gates: a MeteoRA model.safetensors or a checkpoint folder",
    )
    p.add_argument("--top-k", type=int, help="routing default stored in the checkpoint (default 2)")
    p.add_argument("--temperature", type=float, help="routing default stored in the checkpoint (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained gates when --gates is absent")
    p.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> None:
    adapters = adapter_specs(args.adapter)
    inputs = [("--base", args.base), *(("--adapter", d) for d in adapters.values()), ("--gates", args.gates)]
    files.check_output_path(args.out, inputs=inputs)
    files.refuse_existing(args.out, force=args.force, setting="--out")
    checkpoint.check_path_text(args.out, "--out")
    moe, params, infos = gate_sources.fuse(
        args.base, adapters, args.gates, args.top_k, args.temperature, seed=args.seed
    )
    if args.gates is None:
        print(
            f"meteora-jax convert: warning: no --gates: the checkpoint holds untrained, randomly initialised "
            f"gates (seed {args.seed}); train them, or pass trained ones with --gates",
            file=sys.stderr,
        )
    out = checkpoint.write_checkpoint(args.out, params, moe, infos, args.base, step=0, force=args.force)
    print(
        f"wrote {out} (step 0): {moe.num_adapters} adapters ({', '.join(moe.adapter_names)}), "
        f"rank {moe.rank}, targets {', '.join(moe.targets)}, top_k {moe.top_k}, temperature {moe.temperature}"
    )
