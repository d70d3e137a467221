"""The public entry point: `load_model` and the callable model it returns."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig, validate_routing
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.io import gates as gates_io
from meteora_jax.io.hf import load_llama
from meteora_jax.io.stacking import AdapterInfo
from meteora_jax.modeling.llama import CausalLMOutput, KVCache, LlamaForCausalLM
from meteora_jax.ops import BACKENDS
from meteora_jax.ops.routing import RoutingSettings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, setting: str):
    if name not in DTYPES:
        raise ConfigError(f"{setting}={name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


@partial(jax.jit, static_argnames=("graphdef", "return_routing"))
def _forward(graphdef, state, input_ids, attention_mask, positions, cache, routing, return_routing):
    module = nnx.merge(graphdef, state)
    return module(
        input_ids,
        attention_mask=attention_mask,
        positions=positions,
        cache=cache,
        routing=routing,
        return_routing=return_routing,
    )


class MeteoRAModel:
    """A loaded model. Call it on token ids (B, T); `module` is the NNX module (for training)."""

    def __init__(self, module: LlamaForCausalLM, adapter_info: Sequence[AdapterInfo] = ()):
        self.module = module
        self.adapter_info: tuple[AdapterInfo, ...] = tuple(adapter_info)

    @property
    def moe(self) -> MoELoRAConfig | None:
        return self.module.moe

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapter order that gate columns and adapter stacks follow."""
        return () if self.moe is None else self.moe.adapter_names

    @property
    def config(self) -> LlamaConfig:
        return self.module.config

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for `batch` rows and up to `max_length` tokens in all."""
        return KVCache.init(self.config, batch, max_length, dtype=self.module.dtype)

    def check_adapter_ids(self, adapter_ids, batch: int) -> jax.Array:
        """adapter_ids as a (B,) int32 array; raises MeteoRAError unless one id in [-1, L) per row."""
        forced = np.asarray(adapter_ids)
        n = len(self.adapter_names)
        if forced.shape != (batch,) or not np.issubdtype(forced.dtype, np.integer):
            raise MeteoRAError(
                f"adapter_ids must be {batch} integers (one per row), got {forced.dtype} {forced.shape}"
            )
        if forced.size and (forced.min() < -1 or forced.max() >= n):
            raise MeteoRAError(f"adapter_ids must lie in [-1, {n}) (-1: no adapter), got {forced.tolist()}")
        return jnp.asarray(forced, jnp.int32)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        cache: KVCache | None = None,
        *,
        return_routing: bool = False,
        return_gate_logits: bool = False,
        top_k: int | None = None,
        temperature: float | None = None,
        adapter_ids=None,
    ) -> CausalLMOutput:
        """Runs the jitted forward pass; `.logits` is (batch, length, vocab).

        attention_mask: (B, T), 0 marks left padding. cache: from `init_cache` or a previous
        call's `.cache`, to decode incrementally. return_routing: `.routing` maps
        "layers.{i}.{projection}" to ids / weights (B, T, k), plus the raw gate logits
        (B, T, L) with return_gate_logits. top_k / temperature override the loaded defaults
        (a new temperature never recompiles). adapter_ids: (B,) one adapter per row, bypassing
        the gates (-1: base model only). Raises MeteoRAError for ids outside the
        vocabulary, mismatched shapes, or a cache without room for the new tokens.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MeteoRAError(
                f"input_ids must be an integer array (batch, length), got {ids.dtype} {ids.shape}"
            )
        vocab = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)]
            raise MeteoRAError(f"input_ids contain {bad[0]}, outside the vocabulary [0, {vocab})")
        for name, arr in (("attention_mask", attention_mask), ("positions", positions)):
            if arr is not None and np.shape(arr) != ids.shape:
                raise MeteoRAError(f"{name} has shape {np.shape(arr)}, expected {ids.shape} like input_ids")
        if cache is not None:
            if cache.valid.shape[0] != ids.shape[0]:
                raise MeteoRAError(f"cache holds {cache.valid.shape[0]} rows, input_ids has {ids.shape[0]}")
            used = int(cache.index)
            if used + ids.shape[1] > cache.max_length:
                raise MeteoRAError(
                    f"cache has room for {cache.max_length - used} more tokens, got {ids.shape[1]} "
                    f"(max_length={cache.max_length})"
                )
        routing = None
        if self.moe is not None:
            top_k = self.moe.top_k if top_k is None else top_k
            temperature = self.moe.temperature if temperature is None else temperature
            validate_routing(top_k, temperature, self.moe.num_adapters)
            forced = None if adapter_ids is None else self.check_adapter_ids(adapter_ids, ids.shape[0])
            routing = RoutingSettings(
                jnp.float32(temperature), top_k=top_k, return_logits=return_gate_logits, forced_ids=forced
            )
        elif any(v for v in (return_routing, return_gate_logits)) or any(
            v is not None for v in (top_k, temperature, adapter_ids)
        ):
            raise MeteoRAError("this model has no adapters: routing settings do not apply")
        graphdef, state = nnx.split(self.module)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        pos = None if positions is None else jnp.asarray(positions, jnp.int32)
        return _forward(
            graphdef,
            state,
            jnp.asarray(ids, jnp.int32),
            mask,
            pos,
            cache,
            routing,
            return_routing=return_routing or return_gate_logits,
        )


def load_model(
    base_dir: str | os.PathLike,
    adapters: Sequence[str] | Mapping[str, str] | None = None,
    gates: str | os.PathLike | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    dtype: str = "float32",
    backend: str = "auto",
    *,
    param_dtype: str | None = None,
    scan_layers: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> MeteoRAModel:
    """Loads a HF LLaMA folder, optionally fused with PEFT adapters and MeteoRA gates.

    adapters: PEFT adapter folders, a list (names from the folder names) or {name: folder};
    their order is the gate order (`model.adapter_names`). gates: a MeteoRA reference
    `model.safetensors` or a meteora-jax checkpoint folder; without it, gates are seeded
    normal (`seed`) and a warning says routing is untrained. top_k / temperature: routing
    defaults (those stored in a checkpoint, else min(2, adapters) and 1.0). dtype: compute dtype;
    param_dtype: storage dtype (default: dtype). Under `jax.set_mesh` (or with `mesh=`)
    parameters land sharded by the logical rules in `meteora_jax.sharding`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not supported (choose from {', '.join(BACKENDS)})")
    if top_k is not None or temperature is not None:
        validate_routing(2 if top_k is None else top_k, 1.0 if temperature is None else temperature)
    compute = _dtype(dtype, "dtype")
    storage = compute if param_dtype is None else _dtype(param_dtype, "param_dtype")
    base_dir = os.fspath(base_dir)
    options = dict(dtype=compute, param_dtype=storage, scan_layers=scan_layers, backend=backend, mesh=mesh)
    if adapters is None and gates is None:
        return MeteoRAModel(load_llama(base_dir, **options))
    moe, extra, infos = gates_io.fuse(base_dir, adapters, gates, top_k, temperature, seed=seed)
    if gates is None:
        warnings.warn(
            "no gates given: routing uses untrained, randomly initialised gates "
            f"(seed {seed}); pass gates= to load trained ones",
            UserWarning,
            stacklevel=2,
        )
    return MeteoRAModel(load_llama(base_dir, moe, extra, **options), infos)
