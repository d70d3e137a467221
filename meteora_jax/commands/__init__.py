"""Subcommands of the `meteora-jax` command line, one module each, wired in by `meteora_jax.cli`.

Each module exposes `register(subparsers)`, which adds its subcommand and sets `func` to the
handler; handlers raise `MeteoRAError` / `FileNotFoundError` for the CLI to report.
"""

from __future__ import annotations

import os

from meteora_jax.errors import ConfigError


def adapter_specs(specs: list[str], option: str = "--adapter") -> dict[str, str]:
    """`[NAME=]DIR` arguments -> {name: folder}, in order; a name defaults to the folder's name."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or os.sep in name or (os.altsep and os.altsep in name):
            name, folder = os.path.basename(os.path.normpath(os.path.abspath(spec))), spec
        if name in out:
            raise ConfigError(
                f"{option}: two adapters are named {name!r} ({out[name]}, {folder}); use NAME=DIR"
            )
        out[name] = folder
    return out
