"""What callers pass in, checked once: numbers, token arrays, routing settings.

The model call, generation, training and evaluation all check their inputs here, so a bad
value gets the same one-line `MeteoRAError` (naming the setting) whichever entry point it
came through. Dimensions: B batch rows, T tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re

import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.ops.routing import RoutingSettings


def is_int(value) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or numpy real number (not a bool); may be inf or nan."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def read_json(path: str, error: type[MeteoRAError] = ConfigError):
    """The JSON value in the file at `path`; a file that is not UTF-8 JSON raises `error`, naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def check_text(text: str, where: str, *, from_os: bool = False) -> str:
    """`text` if it can be written as UTF-8 (what every tokenizer takes); else ConfigError naming
    `where`: a lone surrogate (JSON allows `"\\ud800"`), or with `from_os` (a command-line
    argument) a byte that was not UTF-8, which Python keeps as a surrogate U+DC80..U+DCFF."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        if from_os and "\udc80" <= char <= "\udcff":
            raise ConfigError(
                f"{where}: holds byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8 text "
                f"(character {e.start + 1})"
            ) from None
        raise ConfigError(f"{where}: a string holds a lone surrogate ({char!r}), which is not text") from None
    return text


def validate_adapter_name(name, where: str) -> str:
    """Checks an adapter name where it enters (a `NAME=DIR` spec, a folder name, a mapping key).

    Names become folder names on export and keys in checkpoints, so they are letters, digits
    and `._-`, 1 to 100 characters, and not `.` or `..`. `where` says where the name came from.
    Raises ConfigError naming it; returns the name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{where}: an adapter name must be a string, got {name!r}")
    if not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
        shown = repr(name) if len(name) <= 40 else f"{name[:37]!r}... ({len(name)} characters)"
        raise ConfigError(
            f"{where}: adapter name {shown} is not allowed (use 1 to 100 letters, digits, '.', '_' "
            "or '-', not '.' or '..'; set it with NAME=DIR or a {name: folder} mapping)"
        )
    return name


def validate_routing(
    top_k, temperature, num_adapters: int | None = None, *, top_k_name="top_k", temperature_name="temperature"
) -> None:
    """Checks routing settings; raises ConfigError naming the setting (as the caller calls it)."""
    if num_adapters is None and not (is_int(top_k) and top_k >= 1):
        raise ConfigError(f"{top_k_name} must be a positive integer, got {top_k!r}")
    if num_adapters is not None and not (is_int(top_k) and 1 <= top_k <= num_adapters):
        raise ConfigError(
            f"{top_k_name} must be an integer in [1, {num_adapters}] (the number of adapters), got {top_k!r}"
        )
    if not (is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"{temperature_name} must be a number > 0, got {temperature!r}")


def check_adapter_ids(adapter_ids, batch: int, num_adapters: int) -> jax.Array:
    """adapter_ids as a (B,) int32 array; raises MeteoRAError unless one id in [-1, L) per row."""
    forced = np.asarray(adapter_ids)
    if forced.shape != (batch,) or not np.issubdtype(forced.dtype, np.integer):
        raise MeteoRAError(
            f"adapter_ids must be {batch} integers (one per row), got {forced.dtype} {forced.shape}"
        )
    if forced.size and (forced.min() < -1 or forced.max() >= num_adapters):
        raise MeteoRAError(
            f"adapter_ids must lie in [-1, {num_adapters}) (-1: no adapter), got {forced.tolist()}"
        )
    return jnp.asarray(forced, jnp.int32)


def resolve_routing(
    moe,
    batch: int,
    *,
    top_k=None,
    temperature=None,
    adapter_ids=None,
    return_routing: bool = False,
    return_logits: bool = False,
    prefix: str = "",
) -> RoutingSettings | None:
    """The routing settings of one call: the model's defaults (`moe`, a MoELoRAConfig or None)
    overridden by the given values, checked. None for a model without adapters, where asking
    for any routing setting is an error. `prefix` is how the caller names the settings
    ("routing_" in `generate`), so the message names the argument the user passed."""
    names = {
        "top_k": f"{prefix}top_k",
        "temperature": f"{prefix}temperature",
    }
    if moe is None:
        given = {
            "return_routing": return_routing or return_logits or None,
            names["top_k"]: top_k,
            names["temperature"]: temperature,
            "adapter_ids": adapter_ids,
        }
        used = [name for name, value in given.items() if value is not None]
        if used:
            raise MeteoRAError(
                f"{', '.join(used)}: this model has no adapters, routing settings do not apply"
            )
        return None
    top_k = moe.top_k if top_k is None else top_k
    temperature = moe.temperature if temperature is None else temperature
    validate_routing(
        top_k, temperature, moe.num_adapters, top_k_name=names["top_k"], temperature_name=names["temperature"]
    )
    forced = None if adapter_ids is None else check_adapter_ids(adapter_ids, batch, moe.num_adapters)
    return RoutingSettings(
        jnp.float32(temperature), top_k=int(top_k), return_logits=return_logits, forced_ids=forced
    )


def format_bytes(nbytes: int) -> str:
    """`nbytes` in the largest binary unit that keeps it >= 1 ("1.5 GiB")."""
    value, unit = float(nbytes), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def device_memory_limit(devices) -> int | None:
    """The memory `devices` hold in all (their `bytes_limit`s summed), or None where one says nothing.

    CPU devices report no memory statistics (`memory_stats()` is None), so there the callers'
    memory checks are skipped: host memory is the operating system's to manage.
    """
    total = 0
    for device in devices:
        try:
            stats = device.memory_stats()
        except (RuntimeError, NotImplementedError):  # a backend without the query
            return None
        if not stats or "bytes_limit" not in stats:
            return None
        total += int(stats["bytes_limit"])
    return total


def check_fits_memory(nbytes: int, devices, what: str) -> None:
    """Refuses up front a buffer of `nbytes` that cannot fit the memory of `devices`.

    The whole limit is the bar, not what is free now: a request over it can never run, while
    memory in use may still be released, so nothing that could run is refused.
    """
    limit = device_memory_limit(devices)
    if limit is not None and nbytes > limit:
        names = ", ".join(sorted(str(d) for d in devices)) if len(devices) <= 4 else f"{len(devices)} devices"
        raise MeteoRAError(
            f"{what} needs {format_bytes(nbytes)}, more than the {format_bytes(limit)} of device memory "
            f"({names}): ask for fewer rows or tokens"
        )


@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """Checked model inputs: ids (B, T) int32, mask (B, T) int32 or None, positions (B, T) or None."""

    input_ids: jax.Array | np.ndarray
    attention_mask: jax.Array | np.ndarray | None
    positions: jax.Array | np.ndarray | None


def _as_array(value):
    """jax arrays stay on device (shape and dtype checks only); anything else becomes numpy."""
    return value if isinstance(value, jax.Array) else np.asarray(value)


def check_tokens(
    input_ids, vocab_size: int, attention_mask=None, positions=None, *, left_padded: bool = False
) -> TokenInputs:
    """Checks token inputs; raises MeteoRAError naming the input at fault.

    input_ids: non-empty (B, T) integers in [0, vocab_size). attention_mask: (B, T) of 0
    (padding) and 1, with a real token in every row; `left_padded` also requires the 0s to come
    first (a KV cache shares one write position across rows). positions: (B, T) integers.
    Values are checked on host arrays only: a `jax.Array` (already on device, as in a decode
    loop fed by the model's own output) gets shape and dtype checks, never a device-to-host copy.
    """
    ids = _as_array(input_ids)
    if ids.ndim != 2 or 0 in ids.shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise MeteoRAError(
            f"input_ids must be a non-empty integer array (batch, length), got {ids.dtype} {ids.shape}"
        )
    if isinstance(ids, np.ndarray) and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise MeteoRAError(f"input_ids contain {bad[0]}, outside the vocabulary [0, {vocab_size})")
    mask = None if attention_mask is None else _as_array(attention_mask)
    pos = None if positions is None else _as_array(positions)
    for name, arr in (("attention_mask", mask), ("positions", pos)):
        if arr is None:
            continue
        if arr.shape != ids.shape:
            raise MeteoRAError(f"{name} has shape {arr.shape}, expected {ids.shape} like input_ids")
        if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.bool_)):
            raise MeteoRAError(f"{name} must hold integers, got {arr.dtype}")
    if isinstance(mask, np.ndarray):
        _check_mask_values(mask, left_padded)
    return TokenInputs(
        input_ids=ids.astype(jnp.int32),
        attention_mask=None if mask is None else mask.astype(jnp.int32),
        positions=None if pos is None else pos.astype(jnp.int32),
    )


def _check_mask_values(mask: np.ndarray, left_padded: bool) -> None:
    if not np.isin(mask, (0, 1)).all():
        raise MeteoRAError("attention_mask must hold only 0 (padding) and 1 (real token)")
    lengths = mask.astype(np.int64).sum(axis=-1)
    if lengths.min() == 0:
        raise MeteoRAError(f"attention_mask row {int(np.argmin(lengths))} has no real token")
    if left_padded:
        steps = np.diff(mask.astype(np.int8), axis=-1) < 0
        if np.any(steps):
            row = int(np.nonzero(np.any(steps, axis=-1))[0][0])
            raise MeteoRAError(
                f"attention_mask must pad on the left (0s, then 1s): row {row} has a 0 after a 1"
            )
