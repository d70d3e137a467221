"""The `meteora-jax` command: one subcommand per module in `meteora_jax.commands`."""

from __future__ import annotations

import argparse
import sys

from meteora_jax.commands import bench, convert, demo, export, generate
from meteora_jax.errors import MeteoRAError

COMMANDS = (demo, convert, export, generate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meteora-jax", description="MeteoRA in JAX: many LoRA adapters fused into one LLaMA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
