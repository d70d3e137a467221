"""The server's settings, declared once: `meteora-jax serve` derives its flags from these fields."""

from __future__ import annotations

import dataclasses

from meteora_jax.errors import ConfigError
from meteora_jax.inputs import is_int, is_real
from meteora_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Where the server listens and how much it takes on; validated on construction (errors name
    the setting and its flag)."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port (0: any free port)")
    slots: int = setting(8, "requests decoded together")
    max_length: int = setting(2048, "prompt + answer tokens of one request at most")
    max_queue: int = setting(64, "requests waiting for a slot at most")
    grace: float = setting(30.0, "seconds running requests get on SIGTERM")

    def __post_init__(self):
        def refuse(name: str, wants: str):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} ({flag}) must be {wants}, got {getattr(self, name)!r}")

        for name in ("slots", "max_queue"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                refuse(name, ">= 1")
        if not (is_int(self.max_length) and self.max_length >= 2):
            refuse("max_length", ">= 2 (a prompt token and an answer token)")
        if not (is_int(self.port) and 0 <= self.port < 65536):
            refuse("port", "in [0, 65536)")
        if not (is_real(self.grace) and self.grace >= 0):
            refuse("grace", ">= 0")
        if not isinstance(self.host, str) or not self.host:
            refuse("host", "an address")


FLAGS = tuple(f.name for f in dataclasses.fields(ServeSettings))
