"""Writing PEFT LoRA folders: the `adapter_config.json` that reproduces an adapter exactly, and its weights.

Every config written is read back with our PEFT rules (`meteora_jax.io.peft`) before it is
saved, so a folder we write loads in `peft.PeftModel.from_pretrained` with the same modules,
ranks and scalings.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from meteora_jax.config import BLOCK_OF, PROJECTIONS, LlamaConfig, projection_shape
from meteora_jax.errors import CheckpointError, OutputExistsError
from meteora_jax.io.files import (
    API_SETTING,
    check_output_path,
    raise_problems,
    staged_directory,
    write_text_atomic,
)
from meteora_jax.io.peft import (  # adapter_targets: the rules every written config is checked against
    CONFIG_FILE,
    SAFETENSORS_FILE,
    LoRAAdapter,
    adapter_targets,
    module_name,
    peft_key,
)
from meteora_jax.io.safetensors_io import save_file


def _most_common(values) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -list(counts).index(v)))


def _pattern(values: dict[tuple[int, str], Any], default) -> dict[str, Any]:
    """rank_pattern / alpha_pattern entries for modules whose value is not the default.

    A projection whose modules all share one value gets one key (`"q_proj"`); otherwise each
    differing module gets its full name, which matches only itself under `get_pattern_key`.
    """
    out = {}
    for projection in PROJECTIONS:
        own = {slot: v for slot, v in values.items() if slot[1] == projection}
        if len(set(own.values())) == 1 and next(iter(own.values())) != default:
            out[projection] = next(iter(own.values()))
        elif len(set(own.values())) > 1:
            out.update({module_name(*slot): v for slot, v in own.items() if v != default})
    return out


def _tidy(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def adapter_config(adapter: LoRAAdapter, num_layers: int | None = None, base_model_name_or_path=None) -> dict:
    """The PEFT `adapter_config.json` dict that reproduces exactly this adapter's modules.

    With `num_layers` (the base model's), an adapter on every layer gets no layers_to_transform.
    """
    ranks = {slot: m.rank for slot, m in adapter.modules.items()}
    alphas = {slot: _tidy(m.alpha) for slot, m in adapter.modules.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    layer_sets = {p: {layer for layer, q in adapter.modules if q == p} for p in adapter.projections}
    all_layers = set(range(num_layers)) if num_layers else None
    layers: list[int] | None = None
    if len({frozenset(s) for s in layer_sets.values()}) == 1:
        targets: list[str] | str = list(adapter.projections)
        only = next(iter(layer_sets.values()))
        layers = None if only == all_layers else sorted(only)
    else:  # per-projection layer sets differ: an exact regex, since PEFT has one layers_to_transform
        targets = "|".join(
            rf"model\.layers\.(?:{'|'.join(map(str, sorted(s)))})\.{BLOCK_OF[p]}\.{p}"
            for p, s in layer_sets.items()
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "rank_pattern": _pattern(ranks, r),
        "alpha_pattern": _pattern(alphas, alpha),
        "use_rslora": adapter.use_rslora,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_files(
    adapter: LoRAAdapter,
    *,
    base_model_name_or_path: str | None = None,
    config: LlamaConfig | None = None,
    lora_dropout: float = 0.0,
    where: str = "",
) -> tuple[dict, dict[str, np.ndarray]]:
    """(the `adapter_config.json` dict, the tensors by PEFT key) of `adapter`, checked: finite
    weights and, with the base `config`, shapes that fit it. `where` names the destination in
    errors. lora_dropout is recorded in the config (PEFT applies it when training further)."""
    problems = []
    for (layer, projection), m in adapter.modules.items():
        for part, w in (("A", m.a), ("B", m.b)):
            if not np.isfinite(w).all():
                problems.append(f"{peft_key(layer, projection, part)} has NaN or Inf values")
        if config is not None:
            fan_in, fan_out = projection_shape(config, projection)
            if layer >= config.num_hidden_layers or m.a.shape[1] != fan_in or m.b.shape[0] != fan_out:
                problems.append(
                    f"module {module_name(layer, projection)} (a {m.a.shape}, b {m.b.shape}) does not fit "
                    f"the base model ({config.num_hidden_layers} layers, (in, out) = {(fan_in, fan_out)})"
                )
    raise_problems(CheckpointError, f"adapter {adapter.name!r} ({where})", problems)
    num_layers = config.num_hidden_layers if config is not None else None
    peft_config = adapter_config(adapter, num_layers, base_model_name_or_path)
    peft_config["lora_dropout"] = float(lora_dropout)
    _verify_config(peft_config, adapter, num_layers or max(layer for layer, _ in adapter.modules) + 1)
    tensors = {}
    for (layer, projection), m in adapter.modules.items():
        tensors[peft_key(layer, projection, "A")] = m.a
        tensors[peft_key(layer, projection, "B")] = m.b
    return peft_config, tensors


def _write_files(folder: str, peft_config: dict, tensors: dict[str, np.ndarray]) -> None:
    """The weights, then the config (a reader that finds the config finds its weights)."""
    save_file(tensors, os.path.join(folder, SAFETENSORS_FILE), metadata={"format": "pt"})
    write_text_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(peft_config, indent=2))


def write_adapter(
    adapter: LoRAAdapter,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    config: LlamaConfig | None = None,
    overwrite: bool = False,
    lora_dropout: float = 0.0,
) -> None:
    """Writes a PEFT LoRA folder (`adapter_config.json` + float32 `adapter_model.safetensors`).

    `config` (the base model's, optional) checks the shapes and lets an adapter on every layer
    omit layers_to_transform. The folder is built under a temporary name and renamed into
    place, so a failure leaves nothing behind; an existing `out_dir` is refused unless
    `overwrite`.
    """
    check_output_path(out_dir, setting=API_SETTING)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists (refusing to overwrite it: pass overwrite=True)")
    peft_config, tensors = adapter_files(
        adapter,
        base_model_name_or_path=base_model_name_or_path,
        config=config,
        lora_dropout=lora_dropout,
        where=f"writing {out_dir}",
    )
    with staged_directory(out_dir, force=overwrite) as tmp:
        _write_files(tmp, peft_config, tensors)


def update_adapter_files(adapter: LoRAAdapter, folder: str | os.PathLike, **options) -> None:
    """Writes (or replaces) the two PEFT files in an existing `folder` that holds other things
    too (train-lora's run state), each file atomically, so a kill leaves the old pair or the new
    weights with a config that describes them (the config does not change within a run).
    options: `adapter_files`' keywords (base_model_name_or_path, config, lora_dropout)."""
    folder = os.path.abspath(os.fspath(folder))
    _write_files(folder, *adapter_files(adapter, where=f"writing {folder}", **options))


def _verify_config(peft_config: dict, adapter: LoRAAdapter, num_layers: int) -> None:
    """Re-reads the generated config with PEFT's rules: it must give back every rank and alpha."""
    targets = adapter_targets(peft_config, num_layers, where="generated adapter config")
    wanted = {slot: (m.rank, m.alpha) for slot, m in adapter.modules.items()}
    if targets != wanted:  # a bug here, never a user error
        raise AssertionError(f"adapter config {peft_config} does not reproduce adapter {adapter.name!r}")
