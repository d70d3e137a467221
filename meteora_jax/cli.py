"""The `meteora-jax` command."""

from __future__ import annotations

import argparse
import sys

from meteora_jax.errors import MeteoRAError


def _demo(args: argparse.Namespace) -> None:
    from meteora_jax.demo import base_model

    base_model.run(out_dir=args.out, seed=args.seed, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meteora-jax", description="MeteoRA in JAX: many LoRA adapters fused into one LLaMA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded end-to-end demo (tiny model, CPU, no downloads)")
    demo.add_argument("--out", help="keep the generated HF model in this folder (default: temporary)")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (MeteoRAError, FileNotFoundError, FileExistsError) as e:
        print(f"meteora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
