"""Subcommands of the `meteora-jax` command line, one module each, wired in by `meteora_jax.cli`.

Each module exposes `register(subparsers)`, which adds its subcommand and sets `func` to the
handler; handlers raise `MeteoRAError` for `run_reporting` to print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from meteora_jax.errors import ConfigError, MeteoRAError, MissingFileError
from meteora_jax.inputs import validate_adapter_name

# OS errors a user causes (a path that is missing, taken, of the wrong kind or not theirs): reported
# like a MeteoRAError, in case a library call below ours raises one before we could check.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def run_reporting(args: argparse.Namespace) -> int:
    """Runs `args.func(args)`; a user error becomes one line on stderr and exit code 2, never a traceback."""
    try:
        args.func(args)
    except (MeteoRAError, *USER_OS_ERRORS) as e:
        message = " ".join(str(e).split("\n"))
        print(f"meteora-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def adapter_specs(specs: list[str], option: str = "--adapter") -> dict[str, str]:
    """`[NAME=]DIR` arguments -> {name: folder}, in order; a name defaults to the folder's name.

    Each name is checked here (`validate_adapter_name`), where it enters, so a bad one fails
    before anything is read.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or os.sep in name or (os.altsep and os.altsep in name):
            name, folder = os.path.basename(os.path.normpath(os.path.abspath(spec))), spec
        validate_adapter_name(name, where=f"{option} {folder}")
        if name in out:
            raise ConfigError(
                f"{option}: two adapters are named {name!r} ({out[name]}, {folder}); use NAME=DIR"
            )
        out[name] = folder
    return out


def checkpoint_folder(path: str, option: str = "--ckpt") -> str:
    """`path` if it is a folder (a checkpoint's); otherwise an error saying what it is instead."""
    if os.path.isfile(path):
        raise ConfigError(
            f"{option} {path} is a file, not a checkpoint folder (pass the folder that "
            "`meteora-jax convert` or training wrote)"
        )
    if not os.path.isdir(path):
        raise MissingFileError(f"{option} {path} does not exist")
    return path
