"""Command-line flags derived from settings declared once (`meteora_jax.settings.setting`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


def add_field_flags(group, cls, names: Sequence[str], *, defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of dataclass `cls` in `names`, from the field's declaration (`setting`):
    `--field-name` with its type, default (or `defaults[name]`, a command's own), choices and help.
    A boolean that defaults to False is a switch (`--new-data`); one that defaults to True is turned
    off by `--no-field-name`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field = fields[name]
        default = (defaults or {}).get(name, field.default)
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = str(field.type).split("|")[0].strip()
        if kind == "bool":
            if default:
                group.add_argument(
                    f"--no-{flag[2:]}", dest=name, action="store_false", help=f"turn off: {help_text}"
                )
            else:
                group.add_argument(flag, action="store_true", help=help_text)
            continue
        shown = (
            ""
            if default is None
            else f" (default {default:g})"
            if kind == "float"
            else f" (default {default})"
        )
        meta = field.metadata
        group.add_argument(
            flag, type={"int": int, "float": float, "str": str}[kind], default=default,
            choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text + shown,
        )  # fmt: skip


def field_values(args: argparse.Namespace, cls, names: Sequence[str]) -> dict:
    """The parsed values of `add_field_flags`' flags, by field name."""
    return {name: getattr(args, name) for name in names}
