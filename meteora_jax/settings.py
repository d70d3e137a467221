"""A setting declared once: a dataclass field carrying its default, its help text and, for a closed
set of values, its choices. Configs validate the choices (`check_choices`); the command line
derives its flags from the same fields (`meteora_jax.commands.flags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING


def setting(
    default: Any = _NO_DEFAULT,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field: `default`, the flag's `help` (the default is added to it when shown),
    `choices` when only some values are allowed, and the flag's `metavar`."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config) -> list[str]:
    """ "name must be one of (...), got X" for each field of `config` whose value is not one of its
    choices."""
    return [
        f"{f.name} must be one of {f.metadata['choices']}, got {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.metadata.get("choices") is not None and getattr(config, f.name) not in f.metadata["choices"]
    ]
