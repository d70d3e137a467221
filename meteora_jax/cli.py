"""The `meteora-jax` command: one subcommand per module in `meteora_jax.commands`."""

from __future__ import annotations

import argparse
import sys

from meteora_jax.commands import (
    bench,
    compile,
    convert,
    demo,
    evaluate,
    export,
    generate,
    make_composite,
    run_reporting,
    train_gate,
    train_lora,
)

COMMANDS = (demo, convert, export, generate, train_gate, train_lora, make_composite, evaluate, bench, compile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meteora-jax", description="MeteoRA in JAX: many LoRA adapters fused into one LLaMA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; 0 on success, 2 (with one line on stderr) for a user error."""
    return run_reporting(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
