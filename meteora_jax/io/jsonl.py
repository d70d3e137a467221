"""JSON-lines input files (task splits, prompt files, composite sets), read one way.

Each non-blank line is decoded as UTF-8 and parsed as JSON on its own, so a bad byte, a bad line
or a string no tokenizer can take (a lone surrogate such as `"\\ud800"`, which JSON allows) is
refused naming the file and line, never a traceback from a codec or the tokenizer later on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from meteora_jax.errors import ConfigError
from meteora_jax.inputs import check_text


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """("FILE line N", the parsed value) of every non-blank line of `path`.

    Raises:
        ConfigError: a line that is not UTF-8 (with the byte's column), not JSON, or holds a
            string with a lone surrogate, each naming the file and line.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
            for text in _strings(value):
                check_text(text, where)
            yield where, value
