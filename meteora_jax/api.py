"""The public entry point: `load_model` and the callable model it returns."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.inputs import check_fits_memory, check_tokens, is_int, resolve_routing, validate_routing
from meteora_jax.io import gate_sources
from meteora_jax.io.hf import load_llama
from meteora_jax.io.stacking import AdapterInfo
from meteora_jax.modeling.attention import DEFAULT_ATTENTION, IMPLEMENTATIONS
from meteora_jax.modeling.llama import CausalLMOutput, KVCache, LlamaForCausalLM
from meteora_jax.ops import BACKENDS
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_DTYPE = "float32"  # what a loaded model computes in unless told


def _dtype(name: str, setting: str):
    if name not in DTYPES:
        raise ConfigError(f"{setting}={name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def _forward(module, input_ids, attention_mask, positions, cache, routing, return_routing):
    return module(
        input_ids,
        attention_mask=attention_mask,
        positions=positions,
        cache=cache,
        routing=routing,
        return_routing=return_routing,
    )


class _CacheLengths:
    """Host-side lengths of the KV caches this model made or returned, keyed by their `index`
    array, so checking a cache's room needs no device-to-host copy (which would stall the
    asynchronous dispatch of a decode loop). Unknown caches fall back to reading the index."""

    def __init__(self):
        self._known: dict[int, tuple[weakref.ref, int]] = {}

    def remember(self, cache: KVCache, length: int) -> None:
        key = id(cache.index)
        self._known[key] = (weakref.ref(cache.index, lambda _, key=key: self._known.pop(key, None)), length)

    def length(self, cache: KVCache) -> int:
        ref, length = self._known.get(id(cache.index), (None, None))
        if ref is not None and ref() is cache.index:
            return length
        return int(cache.index)


class MeteoRAModel:
    """A loaded model. Call it on token ids (B, T); `module` is the NNX module (for training)."""

    def __init__(self, module: LlamaForCausalLM, adapter_info: Sequence[AdapterInfo] = ()):
        self.module = module
        self.adapter_info: tuple[AdapterInfo, ...] = tuple(adapter_info)
        self._cache_lengths = _CacheLengths()
        self._bound: tuple[LlamaForCausalLM, Callable] | None = None

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
        """An empty KV cache for `batch` rows and up to `max_length` tokens in all.

        Raises MeteoRAError for sizes that are not positive integers, or a cache larger than
        the memory of the model's devices (checked where the device reports it).
        """
        for name, value in (("batch", batch), ("max_length", max_length)):
            if not is_int(value) or value < 1:
                raise MeteoRAError(f"init_cache: {name} must be a positive integer, got {value!r}")
        self.check_cache_fits(batch, max_length, f"init_cache(batch={batch}, max_length={max_length})")
        cache = KVCache.init(self.config, batch, max_length, dtype=self.module.dtype)
        self._cache_lengths.remember(cache, 0)
        return cache

    def check_cache_fits(self, batch: int, max_length: int, what: str) -> None:
        """Refuses, before anything is allocated, a KV cache of `batch` x `max_length` slots that
        cannot fit the memory of the devices holding the model; `what` names the request."""
        make = lambda: KVCache.init(self.config, batch, max_length, dtype=self.module.dtype)  # noqa: E731
        nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(make)))
        c = self.config
        detail = (
            f"a KV cache of {batch} rows x {max_length} slots ({c.num_hidden_layers} layers x "
            f"{c.num_key_value_heads} KV heads x {c.head_dim} head dim, keys and values, "
            f"{jnp.dtype(self.module.dtype).name})"
        )
        check_fits_memory(nbytes, self.devices(), f"{what}: {detail}")

    def devices(self) -> set[jax.Device]:
        """The devices holding the model's parameters."""
        leaf = next(iter(jax.tree.leaves(nnx.state(self.module, nnx.Param))), None)
        return set(leaf.devices()) if isinstance(leaf, jax.Array) else {jax.devices()[0]}

    def forward_program(self) -> Callable:
        """The jitted forward bound to `module` (`nnx.jit_partial`): its variables are flattened
        once, so a call costs what the program costs (no per-call graph walk, no copy of the
        parameters out of the program, which `graph_updates` would add), and it still sees
        in-place updates of their values (a training step, `nnx.update`). Assigning another
        module to `.module` rebinds."""
        if self._bound is None or self._bound[0] is not self.module:
            program = nnx.jit_partial(
                _forward, self.module, static_argnames=("return_routing",), graph=True, graph_updates=False
            )
            self._bound = (self.module, program)
        return self._bound[1]

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
        the gates (-1: base model only). Raises MeteoRAError for ids outside the vocabulary
        (checked on host arrays; a `jax.Array` gets shape checks only), mismatched shapes, or a
        cache without room for the new tokens.
        """
        tokens = check_tokens(input_ids, self.config.vocab_size, attention_mask, positions)
        b, t = tokens.input_ids.shape
        if cache is not None:
            if cache.valid.shape[0] != b:
                raise MeteoRAError(f"cache holds {cache.valid.shape[0]} rows, input_ids has {b}")
            used = self._cache_lengths.length(cache)
            if used + t > cache.max_length:
                raise MeteoRAError(
                    f"cache has room for {cache.max_length - used} more tokens, got {t} "
                    f"(max_length={cache.max_length})"
                )
        routing = resolve_routing(
            self.moe,
            b,
            top_k=top_k,
            temperature=temperature,
            adapter_ids=adapter_ids,
            return_routing=return_routing,
            return_logits=return_gate_logits,
        )
        out = self.forward_program()(
            tokens.input_ids,
            tokens.attention_mask,
            tokens.positions,
            cache,
            routing,
            return_routing=return_routing or return_gate_logits,
        )
        if cache is not None:
            self._cache_lengths.remember(out.cache, used + t)
        return out


def load_model(
    base_dir: str | os.PathLike,
    adapters: Sequence[str] | Mapping[str, str] | None = None,
    gates: str | os.PathLike | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    dtype: str = DEFAULT_DTYPE,
    backend: str = DEFAULT_BACKEND,
    *,
    param_dtype: str | None = None,
    scan_layers: bool = True,
    attention: str = DEFAULT_ATTENTION,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> MeteoRAModel:
    """Loads a HF LLaMA folder, optionally fused with PEFT adapters and MeteoRA gates.

    adapters: PEFT adapter folders, a list (names from the folder names) or {name: folder};
    their order is the gate order (`model.adapter_names`). gates: a MeteoRA reference
    `model.safetensors` or a meteora-jax checkpoint folder; without it, gates are seeded
    normal (`seed`) and a warning says routing is untrained. top_k / temperature: routing
    defaults (those stored in a checkpoint, else min(2, adapters) and 1.0). dtype: compute dtype;
    param_dtype: storage dtype (default: dtype). attention: "auto" | "xla" | "cudnn" | "splash"
    (`meteora_jax.modeling.attention`). Under `jax.set_mesh` (or with `mesh=`)
    parameters land sharded by the logical rules in `meteora_jax.sharding`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not supported (choose from {', '.join(BACKENDS)})")
    if attention not in IMPLEMENTATIONS:
        raise ConfigError(
            f"attention={attention!r} is not supported (choose from {', '.join(IMPLEMENTATIONS)})"
        )
    if top_k is not None or temperature is not None:
        validate_routing(2 if top_k is None else top_k, 1.0 if temperature is None else temperature)
    compute = _dtype(dtype, "dtype")
    storage = compute if param_dtype is None else _dtype(param_dtype, "param_dtype")
    base_dir = os.fspath(base_dir)
    options = dict(dtype=compute, param_dtype=storage, scan_layers=scan_layers, backend=backend, mesh=mesh)
    options["attention"] = attention
    if adapters is None and gates is None:
        return MeteoRAModel(load_llama(base_dir, **options))
    moe, extra, infos = gate_sources.fuse(base_dir, adapters, gates, top_k, temperature, seed=seed)
    if gates is None:
        warnings.warn(
            "no gates given: routing uses untrained, randomly initialised gates "
            f"(seed {seed}); pass gates= to load trained ones",
            UserWarning,
            stacklevel=2,
        )
    return MeteoRAModel(load_llama(base_dir, moe, extra, **options), infos)
