"""Generation benchmark: decode tokens/s of a many-adapter MeteoRA model against its base model.

Both models are random (built in memory, nothing read or downloaded) with the same LLaMA shape,
and are measured in the same run, interleaved repeat by repeat, so machine noise hits both
alike. Per batch size:

- prefill: one prompt forward pass into a fresh KV cache (the jitted prefill program);
- decode: (t(N new tokens) - t(1 new token)) / (N - 1) per step, from two whole-generation
  programs, so prefill, dispatch and compile time cancel out; reported as tokens/s
  (batch * steps / seconds). Generation never stops early (no EOS).

Every figure is the median of `repeats` timed runs after one warm-up (compile) run
(`meteora_jax.bench.timing`).
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.api import DEFAULT_DTYPE, DTYPES, MeteoRAModel
from meteora_jax.bench.tables import base_and_meteora_rows, markdown_table, mixture_title
from meteora_jax.bench.timing import REFERENCE_MIXTURE, REPEATS, interleaved
from meteora_jax.config import PROJECTIONS, TOP_K, LlamaConfig, MoELoRAConfig
from meteora_jax.errors import ConfigError
from meteora_jax.generation import (
    GenerationPlan,
    GenerationSettings,
    SamplingArrays,
    generate,
    prefill_program,
)
from meteora_jax.inputs import resolve_routing
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND


@dataclasses.dataclass(frozen=True)
class GenerateBenchSettings:
    """Model shape and measurement sizes (defaults: a small model that runs on a laptop CPU)."""

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    num_adapters: int = REFERENCE_MIXTURE[0]
    rank: int = REFERENCE_MIXTURE[1]
    top_k: int = TOP_K
    prompt_length: int = 64
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = REPEATS
    dtype: str = DEFAULT_DTYPE
    backend: str = DEFAULT_BACKEND
    seed: int = 0

    def __post_init__(self):
        if self.repeats < REPEATS:
            raise ConfigError(f"repeats must be >= {REPEATS} (the figures are medians), got {self.repeats}")
        if self.new_tokens < 2:
            raise ConfigError(f"new_tokens must be >= 2 (decode time is a difference), got {self.new_tokens}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch_sizes must be positive, got {self.batch_sizes}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported (choose from {', '.join(DTYPES)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            max_position_embeddings=max(2048, self.prompt_length + self.new_tokens),
        )

    def moe(self) -> MoELoRAConfig:
        names = tuple(f"adapter_{i:02d}" for i in range(self.num_adapters))
        return MoELoRAConfig(adapter_names=names, targets=PROJECTIONS, rank=self.rank, top_k=self.top_k)


def bench_models(s: GenerateBenchSettings) -> dict[str, MeteoRAModel]:
    """{"base": the random base, "meteora": the same base with `s.num_adapters` random adapters}."""
    dtype = DTYPES[s.dtype]
    kw = dict(dtype=dtype, param_dtype=dtype, backend=s.backend)
    base = LlamaForCausalLM(s.llama(), rngs=nnx.Rngs(s.seed), **kw)
    fused = LlamaForCausalLM(s.llama(), s.moe(), rngs=nnx.Rngs(s.seed), **kw)
    # LoRA B starts at zero; random values make sure nothing is skipped as trivially zero.
    for _, variable in nnx.iter_graph(fused):
        if isinstance(variable, nnx.LoRAParam) and not np.any(np.asarray(variable[...])):
            variable[...] = 0.01 * jax.random.normal(jax.random.key(s.seed + 1), variable[...].shape, dtype)
    return {"base": MeteoRAModel(base), "meteora": MeteoRAModel(fused)}


def _runners(model: MeteoRAModel, s: GenerateBenchSettings, batch: int):
    """Three zero-argument callables: prefill, generate 1 token, generate N tokens."""
    ids = np.random.default_rng(s.seed).integers(3, s.vocab_size, (batch, s.prompt_length))
    settings = GenerationSettings(max_new_tokens=s.new_tokens)
    graphdef, params = nnx.split(model.module)
    ids_bp, mask_bp = jnp.asarray(ids, jnp.int32), jnp.ones((batch, s.prompt_length), jnp.int32)
    sampling = SamplingArrays.of(settings, s.vocab_size)
    routing = resolve_routing(model.moe, batch)
    plan = GenerationPlan(s.new_tokens, return_routing=False, output_logits=False)

    def prefill():
        return prefill_program(graphdef, params, ids_bp, mask_bp, sampling, routing, plan).logits_bv

    def run(n):
        return lambda: generate(model, ids, max_new_tokens=n, eos_token_id=[]).sequences

    return prefill, run(1), run(s.new_tokens)


def bench_generate(settings: GenerateBenchSettings | None = None, **overrides) -> dict:
    """Measures prefill time and decode tokens/s, MeteoRA vs base, per batch size.

    Returns {"settings": {...}, "device": str, "results": [{"batch", "base": {...},
    "meteora": {...}, "decode_ratio", "prefill_ratio"}]}; ratios are MeteoRA speed / base
    speed (1.0: no overhead; the target is >= 0.90 for decode).
    """
    s = dataclasses.replace(settings or GenerateBenchSettings(), **overrides)
    models = bench_models(s)
    runs = {}  # interleaved: base, meteora, base, ... (everything compiled before any timing)
    for name, model in models.items():
        for b in s.batch_sizes:
            prefill, one, many = _runners(model, s, b)
            runs.update({(name, b, "prefill"): prefill, (name, b, "one"): one, (name, b, "many"): many})
    samples = interleaved(runs, s.repeats)
    results = []
    for b in s.batch_sizes:
        row = {"batch": b}
        for name in models:
            prefill_s = statistics.median(samples[(name, b, "prefill")])
            one_s, many_s = samples[(name, b, "one")], samples[(name, b, "many")]
            # Per repeat, so both runs of a difference see the same machine state.
            steps = [(t - t1) / (s.new_tokens - 1) for t, t1 in zip(many_s, one_s, strict=True)]
            step_s = statistics.median(steps)
            row[name] = {
                "prefill_s": prefill_s,
                "decode_step_s": step_s,
                "decode_tokens_per_s": b / step_s if step_s > 0 else float("inf"),
            }
        row["decode_ratio"] = row["meteora"]["decode_tokens_per_s"] / row["base"]["decode_tokens_per_s"]
        row["prefill_ratio"] = row["base"]["prefill_s"] / row["meteora"]["prefill_s"]
        results.append(row)
    return {"settings": dataclasses.asdict(s), "device": str(jax.devices()[0]), "results": results}


def format_bench(report: dict) -> str:
    """A markdown table of a `bench_generate` report."""
    s = report["settings"]
    title = f"{mixture_title(s)}, prompt {s['prompt_length']}, {s['new_tokens']} new tokens, {s['dtype']}"
    header = "batch | base decode tok/s | MeteoRA decode tok/s | ratio | base prefill ms | MeteoRA prefill ms"
    rows = base_and_meteora_rows(
        report["results"], "batch", "decode_tokens_per_s", "decode_ratio", "prefill_s"
    )
    lines = [f"{title}, median of {s['repeats']}; {report['device']}", "", *markdown_table(header, rows)]
    return "\n".join(lines)
