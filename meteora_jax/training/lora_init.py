"""A new LoRA adapter as PEFT initialises one: A uniform (kaiming, a = sqrt(5)), B zero.

With B zero the adapter changes nothing at step 0, so training starts from the base model
exactly; `train-lora` (issue 10) trains it and writes it with `io.peft_write.write_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from meteora_jax.config import PROJECTIONS, LlamaConfig, projection_shape
from meteora_jax.errors import ConfigError
from meteora_jax.inputs import is_int, is_real, validate_adapter_name
from meteora_jax.io.peft import LoRAAdapter, LoRAModule

ALL_LINEAR = "all-linear"


def parse_targets(spec: str | Sequence[str], setting: str = "--targets") -> tuple[str, ...]:
    """`"q_proj,v_proj"` / `"all-linear"` / a list -> projections in PROJECTIONS order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == [ALL_LINEAR]:
        return PROJECTIONS
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        raise ConfigError(
            f"{setting} {spec!r}: unknown target module {', '.join(unknown) or '(none given)'} "
            f"(choose from {', '.join(PROJECTIONS)} or {ALL_LINEAR})"
        )
    return tuple(p for p in PROJECTIONS if p in names)


def new_adapter(
    name: str,
    config: LlamaConfig,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = PROJECTIONS,
    layers: Sequence[int] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
) -> LoRAAdapter:
    """A PEFT-initialised adapter on `targets` of `layers` (default: every layer).

    Raises ConfigError naming the setting: rank < 1, alpha <= 0 (or not finite), layers outside
    the model, an unknown target.
    """
    validate_adapter_name(name, "train-lora")
    if not is_int(rank) or rank < 1:
        raise ConfigError(f"--rank must be an integer >= 1, got {rank!r}")
    if not is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"--alpha must be a finite number > 0, got {alpha!r}")
    targets = parse_targets(targets)
    y = config.num_hidden_layers
    layers = list(range(y)) if layers is None else list(layers)
    outside = [i for i in layers if not is_int(i) or not 0 <= i < y]
    if not layers:
        raise ConfigError(f"--layers names no layer: the adapter would adapt nothing (layers 0 to {y - 1})")
    if outside:
        raise ConfigError(
            f"--layers {layers}: {outside} outside the base model, which has {y} layers (0 to {y - 1})"
        )
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in sorted(set(layers)):
        for projection in targets:
            d_in, d_out = projection_shape(config, projection)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
            a = rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32)
            b = np.zeros((d_out, rank), np.float32)
            modules[(layer, projection)] = LoRAModule.from_alpha(a, b, alpha, use_rslora)
    return LoRAAdapter(name, modules, use_rslora=use_rslora)
