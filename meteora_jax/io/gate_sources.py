"""Where trained MeteoRA parameters come from: `gates=` of `load_model` and `convert --gates`.

A file is a MeteoRA reference `model.safetensors` (`meteora_torch`); a folder is our own
checkpoint (`checkpoint`). The reference stores no adapter order or scalings, so it always needs
the adapters; our checkpoint stores both, so the adapters may come from it alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.errors import CheckpointError, ConfigError, MissingFileError
from meteora_jax.inputs import validate_adapter_name
from meteora_jax.io import checkpoint, meteora_torch
from meteora_jax.io.files import raise_problems
from meteora_jax.io.peft import LoRAAdapter, read_adapters
from meteora_jax.io.stacking import AdapterInfo, ParamPath, init_gates, moe_config_for, stack_adapters

DEFAULT_TOP_K, DEFAULT_TEMPERATURE = MoELoRAConfig.top_k, MoELoRAConfig.temperature


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "checkpoint"
    if os.path.isfile(path):
        return "reference"
    raise MissingFileError(
        f"gates {path} does not exist "
        "(expected a MeteoRA model.safetensors or a meteora-jax checkpoint folder)"
    )


def routing_defaults(
    path: str | os.PathLike | None, adapters: Sequence[LoRAAdapter] = ()
) -> tuple[int, float]:
    """(top_k, temperature) stored in a checkpoint folder; the library defaults otherwise.

    Given the adapters, a checkpoint of other adapters (names or order) is refused here, before
    the mixture is built, so the user sees the mismatch rather than a routing error it causes.
    """
    if path is None or _kind(os.fspath(path)) != "checkpoint":
        # One adapter routes top-1 (plain LoRA) by default.
        return (min(DEFAULT_TOP_K, len(adapters)) if adapters else DEFAULT_TOP_K), DEFAULT_TEMPERATURE
    step, meta = checkpoint.read_meta(path)
    if adapters:
        _check_names(meta, [a.name for a in adapters], f"{os.fspath(path)} (step {step})")
    return meta.top_k, meta.temperature


def load_gates(
    path: str | os.PathLike,
    config: LlamaConfig,
    moe: MoELoRAConfig,
    adapters: Sequence[LoRAAdapter],
    base_dir: str | os.PathLike,
) -> dict[ParamPath, np.ndarray]:
    """Trained MeteoRA parameters for a mixture of `adapters` (in their order) over `base_dir`.

    A reference file gives the gates (and the adapter stacks when it holds them). A checkpoint
    gives gates, stacks and scales, after checking that it was built on this base and that the
    adapters match its own in names, order, targets, ranks, alphas and rsLoRA; its stacks win
    (training may have changed them).
    """
    path = os.fspath(path)
    if _kind(path) == "reference":
        return meteora_torch.read_reference(path, config, moe, adapters, base_dir)
    step, meta = checkpoint.read_meta(path)
    where = f"{path} (step {step})"
    checkpoint.check_base(meta, base_dir, where, config)
    _check_adapters(meta, moe, adapters, where)
    return dict(checkpoint.restore(path, step).params)


def _check_names(meta: checkpoint.CheckpointMeta, given: list[str], where: str) -> None:
    if list(meta.adapter_names) != given:
        same_set = sorted(given) == sorted(meta.adapter_names)
        raise ConfigError(
            f"checkpoint {where} holds the adapters {list(meta.adapter_names)}, but adapters= gives {given}"
            + (" (same adapters, other order)" if same_set else "")
            + ": pass them in the checkpoint's order, or omit adapters= to use the checkpoint's own"
        )


def _check_adapters(meta: checkpoint.CheckpointMeta, moe: MoELoRAConfig, adapters, where: str) -> None:
    _check_names(meta, [a.name for a in adapters], where)
    problems = []
    if (moe.targets, moe.rank) != (meta.targets, meta.rank):
        problems.append(
            f"the adapters target {list(moe.targets)} with rank {moe.rank}, the checkpoint "
            f"{list(meta.targets)} with rank {meta.rank}"
        )
    for adapter, stored in zip(adapters, meta.adapters, strict=True):
        info = AdapterInfo.of(adapter)
        if info.ranks != stored.ranks:
            changed = sorted(
                k for k in info.ranks.keys() | stored.ranks.keys() if info.ranks.get(k) != stored.ranks.get(k)
            )
            layer, proj = changed[0]
            given, kept = info.ranks.get((layer, proj)), stored.ranks.get((layer, proj))
            problems.append(
                f"adapter {adapter.name!r} ({adapter.source}) differs in its modules or ranks, e.g. "
                f"layer {layer} {proj}: rank {given} given vs {kept} stored"
            )
        elif any(not math.isclose(info.alphas[k], stored.alphas[k], rel_tol=1e-6) for k in info.alphas):
            problems.append(
                f"adapter {adapter.name!r} ({adapter.source}) has other lora_alpha values than stored"
            )
        if info.use_rslora != stored.use_rslora:
            problems.append(
                f"adapter {adapter.name!r} has use_rslora={info.use_rslora}, "
                f"the checkpoint {stored.use_rslora}"
            )
    raise_problems(CheckpointError, f"checkpoint {where} does not match adapters=", problems)


def load_checkpoint_adapters(
    path: str | os.PathLike,
    config: LlamaConfig,
    base_dir: str | os.PathLike,
    top_k: int | None = None,
    temperature: float | None = None,
) -> tuple[MoELoRAConfig, dict[ParamPath, np.ndarray], list[AdapterInfo]]:
    """The mixture, its parameters and adapter infos, all from a checkpoint folder.

    top_k / temperature None means the checkpoint's stored values. A reference file cannot
    be used this way (it stores no adapter order or scalings): ConfigError says to pass adapters=.
    """
    path = os.fspath(path)
    if _kind(path) == "reference":
        raise ConfigError(
            f"{path} is a MeteoRA reference checkpoint, which stores no adapter order or scalings: "
            "pass adapters= (the PEFT folders, in the order used to train it) together with gates="
        )
    step, meta = checkpoint.read_meta(path)
    checkpoint.check_base(meta, base_dir, f"{path} (step {step})", config)
    moe = meta.moe(top_k, temperature)
    return moe, dict(checkpoint.restore(path, step).params), list(meta.adapters)


def fuse(
    base_dir: str | os.PathLike,
    adapters: Sequence[str] | Mapping[str, str] | None,
    gates: str | os.PathLike | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
) -> tuple[MoELoRAConfig, dict[ParamPath, np.ndarray], list[AdapterInfo]]:
    """What `load_model` assembles before it touches the base weights: the mixture config, every
    MeteoRA parameter by path (gates, stacks, scales) and the adapter infos. Without gates, the
    gates are seeded normal (`init_gates`, untrained). Used by `convert`, so a checkpoint is made
    without loading the base model. Adapter names are checked here (`validate_adapter_name`):
    every way adapters enter (`load_model`, `convert`, training) comes through this function.
    """
    base_dir = os.fspath(base_dir)
    config = LlamaConfig.from_hf(base_dir)
    if adapters is None:
        if gates is None:
            raise ConfigError("give adapters, a checkpoint, or both")
        return load_checkpoint_adapters(gates, config, base_dir, top_k, temperature)
    adapter_list = read_adapters(adapters, config)
    for adapter in adapter_list:
        validate_adapter_name(adapter.name, where=f"adapters= ({adapter.source})")
    stored_k, stored_t = routing_defaults(gates, adapter_list)
    moe = moe_config_for(
        adapter_list,
        top_k=stored_k if top_k is None else top_k,
        temperature=stored_t if temperature is None else temperature,
    )
    params = stack_adapters(adapter_list, config, moe)
    if gates is None:
        params.update(init_gates(config, moe, seed))
    else:
        params.update(load_gates(gates, config, moe, adapter_list, base_dir))
    return moe, params, [AdapterInfo.of(a) for a in adapter_list]
