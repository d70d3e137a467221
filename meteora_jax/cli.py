"""The `meteora-jax` command: one subcommand per module in `meteora_jax.commands`."""

from __future__ import annotations

import argparse
import sys

from meteora_jax.commands import (
    add_command,
    bench,
    compile,
    convert,
    demo,
    evaluate,
    export,
    generate,
    make_composite,
    run_reporting,
    serve,
    train_gate,
    train_lora,
)

COMMANDS = (
    demo, convert, export, generate, train_gate, train_lora, make_composite, evaluate, serve, bench, compile
)  # fmt: skip


class UsageError(Exception):
    """A command line argparse refuses: `prog` (the command) and argparse's message."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused command line raised (`main` reports it in one line) instead of
    the usage block and `SystemExit`; its subcommand parsers are of this class too."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meteora-jax", description="MeteoRA in JAX: many LoRA adapters fused into one LLaMA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        add_command(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; 0 on success, 2 (with one line on stderr) for a user error, a command
    line argparse refuses included."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    return run_reporting(args)


if __name__ == "__main__":
    sys.exit(main())
