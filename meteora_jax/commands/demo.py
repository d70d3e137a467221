"""`meteora-jax demo`: the embedded end-to-end example (tiny model, CPU, nothing downloaded)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the embedded end-to-end demo (tiny model, CPU, no downloads)"
    )
    demo.add_argument("--out", help="keep the generated HF model in this folder (default: temporary)")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from meteora_jax.demo import base_model  # noqa: PLC0415
    from meteora_jax.io.files import check_output_path  # noqa: PLC0415

    if args.out is not None:
        check_output_path(args.out)
    base_model.run(out_dir=args.out, seed=args.seed, force=args.force)
