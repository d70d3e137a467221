"""The public entry point: `load_model` and the callable model it returns."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import LlamaConfig
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.io.hf import load_llama
from meteora_jax.modeling.llama import CausalLMOutput, KVCache, LlamaForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BACKENDS = ("auto", "xla")


def _dtype(name: str, setting: str):
    if name not in DTYPES:
        raise ConfigError(f"{setting}={name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids, attention_mask, positions, cache):
    module = nnx.merge(graphdef, state)
    return module(input_ids, attention_mask=attention_mask, positions=positions, cache=cache)


class MeteoRAModel:
    """A loaded model. Call it on token ids (B, T); `module` is the NNX module (for training)."""

    def __init__(self, module: LlamaForCausalLM, adapter_names: Sequence[str] = ()):
        self.module = module
        self.adapter_names: tuple[str, ...] = tuple(adapter_names)

    @property
    def config(self) -> LlamaConfig:
        return self.module.config

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for `batch` rows and up to `max_length` tokens in all."""
        return KVCache.init(self.config, batch, max_length, dtype=self.module.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """Runs the jitted forward pass; `.logits` is (batch, length, vocab).

        attention_mask: (B, T), 0 marks left padding. cache: from `init_cache` or a previous
        call's `.cache`, to decode incrementally. Raises MeteoRAError for ids outside the
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
        graphdef, state = nnx.split(self.module)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        pos = None if positions is None else jnp.asarray(positions, jnp.int32)
        return _forward(graphdef, state, jnp.asarray(ids, jnp.int32), mask, pos, cache)


def load_model(
    base_dir: str | os.PathLike,
    adapters: Sequence[str] | Mapping[str, str] | None = None,
    gates: str | os.PathLike | None = None,
    top_k: int = 2,
    temperature: float = 1.0,
    dtype: str = "float32",
    backend: str = "auto",
    *,
    param_dtype: str | None = None,
    scan_layers: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> MeteoRAModel:
    """Loads a HF LLaMA folder (and, later, MeteoRA adapters and gates) as a callable model.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). Under `jax.set_mesh`
    (or with `mesh=`) parameters land sharded by the logical rules in `meteora_jax.sharding`.
    """
    if adapters is not None or gates is not None:
        raise NotImplementedError(
            "adapters= and gates= are not supported yet: this release loads the base LLaMA only"
        )
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not supported (choose from {', '.join(BACKENDS)})")
    compute = _dtype(dtype, "dtype")
    storage = compute if param_dtype is None else _dtype(param_dtype, "param_dtype")
    module = load_llama(
        os.fspath(base_dir), dtype=compute, param_dtype=storage, scan_layers=scan_layers, mesh=mesh
    )
    return MeteoRAModel(module)
