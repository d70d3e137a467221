"""The server's settings, declared once: `meteora-jax serve` derives its flags from these fields."""

from __future__ import annotations

import dataclasses

from meteora_jax.errors import ConfigError
from meteora_jax.inputs import is_int, is_real
from meteora_jax.settings import setting

# The default --max-length when the model allows more: every slot holds a KV cache this long.
MAX_LENGTH_CAP = 2048


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Where the server listens and how much it takes on; validated on construction (errors name
    the setting and its flag)."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port (0: any free port)")
    slots: int = setting(8, "requests decoded together")
    max_length: int | None = setting(
        None,
        f"prompt + answer tokens of one request at most (default: the model's positions, at most "
        f"{MAX_LENGTH_CAP})",
    )
    max_queue: int = setting(64, "requests waiting for a slot at most")
    grace: float = setting(30.0, "seconds running requests get on SIGTERM")

    def __post_init__(self):
        def refuse(name: str, wants: str):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} ({flag}) must be {wants}, got {getattr(self, name)!r}")

        for name in ("slots", "max_queue"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                refuse(name, ">= 1")
        if self.max_length is not None and not (is_int(self.max_length) and self.max_length >= 2):
            refuse("max_length", ">= 2 (a prompt token and an answer token)")
        if not (is_int(self.port) and 0 <= self.port < 65536):
            refuse("port", "in [0, 65536)")
        if not (is_real(self.grace) and self.grace >= 0):
            refuse("grace", ">= 0")
        if not isinstance(self.host, str) or not self.host:
            refuse("host", "an address")

    def length_for(self, positions: int) -> int:
        """The request length a model of `positions` positions serves: `max_length`, or by default
        `positions` up to `MAX_LENGTH_CAP`. Raises ConfigError when `max_length` exceeds them."""
        if self.max_length is None:
            return min(positions, MAX_LENGTH_CAP)
        if self.max_length > positions:
            raise ConfigError(
                f"max_length (--max-length) {self.max_length} exceeds the model's "
                f"max_position_embeddings={positions}"
            )
        return self.max_length


FLAGS = tuple(f.name for f in dataclasses.fields(ServeSettings))
