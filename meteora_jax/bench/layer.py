"""`meteora-jax bench layer|model`: MoE-LoRA cost measured side by side with its baselines.

Every figure is a ratio to the base model measured in the same run: each repeat times every
variant once, in turn (interleaved, so drift hits all alike), and the median over repeats is
reported. Absolute times are printed for context only. Peak memory is XLA's own accounting
of the compiled program's temporary buffers.

`reference_wall_ratio` is the reference algorithm's wall time over ours (same shapes, same
run); `speedup_vs_reference` compares overheads, each to its own framework's base layer.

Variants: `base` (no adapters), `lora` (one plain LoRA of the same rank on the same
projections), `meteora[<backend>]` (L adapters, top-k routing), and, when torch is
asked for (`torch_reference`, the default; it needs torch), the reference implementation's
algorithm (per-token gather of the chosen adapters' weights, then two bmm) against torch's own
base layer (`meteora_jax.bench.torch_reference`). Timing: `meteora_jax.bench.timing`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from meteora_jax.bench.timing import REFERENCE_MIXTURE, REPEATS, SETTLE_SECONDS, interleaved, medians
from meteora_jax.config import PROJECTIONS, TOP_K, LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import ConfigError
from meteora_jax.modeling.llama import KVCache, LlamaForCausalLM
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND, choose_backend
from meteora_jax.ops.routing import RoutingSettings

# LLaMA-3-8B's decoder layer (the vocabulary is irrelevant to a layer and kept tiny).
LLAMA3_8B_LAYER = LlamaConfig(
    vocab_size=256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=1,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure: adapters x rank with top-k routing, at each token count.

    torch_reference: also time the reference algorithm in torch (needs torch, the test extra).
    """

    adapters: int = REFERENCE_MIXTURE[0]
    rank: int = REFERENCE_MIXTURE[1]
    top_k: int = TOP_K
    prefill_tokens: tuple[int, ...] = (512, 2048)
    decode_tokens: tuple[int, ...] = (1, 8)
    decode_context: int = 512
    backends: tuple[str, ...] = (DEFAULT_BACKEND,)
    repeats: int = REPEATS
    torch_reference: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.repeats < 1 or self.adapters < 1 or self.rank < 1 or not 1 <= self.top_k <= self.adapters:
            raise ConfigError("bench needs repeats, adapters, rank >= 1 and 1 <= top_k <= adapters")


def build_model(config: LlamaConfig, n_adapters: int, rank: int, top_k: int, backend: str, seed: int):
    """A random model; with adapters, random non-zero A, B and gates on all seven projections."""
    moe = None
    if n_adapters:
        names = tuple(f"adapter_{i}" for i in range(n_adapters))
        moe = MoELoRAConfig(adapter_names=names, targets=PROJECTIONS, rank=rank, top_k=top_k)
    model = LlamaForCausalLM(config, moe, backend=backend, rngs=nnx.Rngs(seed))
    if moe is not None:  # LoRA B starts at zero; give every adapter real weights
        lora = nnx.state(model, nnx.LoRAParam)
        keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(lora))))
        nnx.update(
            model, jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype) * 0.02, lora)
        )
    return model


def _compiled(model: LlamaForCausalLM, tokens: int, context: int, top_k: int):
    """(run(), peak temp bytes) for a forward over `tokens` new tokens after `context` cached ones."""
    graphdef, state = nnx.split(model)
    ids = jnp.ones((1, tokens), jnp.int32)
    routing = None if model.moe is None else RoutingSettings(jnp.float32(1.0), top_k=top_k)
    cache = None
    if context:
        cache = KVCache.init(model.config, 1, context + tokens, model.dtype)
        cache = dataclasses.replace(
            cache, valid=cache.valid.at[:, :context].set(True), index=jnp.int32(context)
        )

    def forward(state, ids, cache, routing):
        return nnx.merge(graphdef, state)(ids, cache=cache, routing=routing).logits

    compiled = jax.jit(forward).lower(state, ids, cache, routing).compile()
    memory = compiled.memory_analysis()
    peak = None if memory is None else int(memory.temp_size_in_bytes)
    return (lambda: compiled(state, ids, cache, routing).block_until_ready()), peak


# The reference algorithm copies the chosen adapters' weights per token; past this it would
# swap or crash a 24 GiB machine, so the comparison is skipped (and the row says why).
TORCH_GATHER_BUDGET = 6 * 2**30


def _reference_gather_bytes(config: LlamaConfig, settings: BenchSettings, tokens: int) -> int:
    """Bytes of the reference's largest per-projection gather: T*k copies of A (r x in) and B (out x r)."""
    d, f = config.hidden_size, config.intermediate_size
    widest = max(d + config.num_attention_heads * config.head_dim, d + f)
    return tokens * settings.top_k * settings.rank * widest * 4


def auto_choices(config: LlamaConfig, settings: BenchSettings, tokens: int) -> dict[str, list[str]]:
    """{backend: [projections]}: what "auto" runs for each projection at `tokens` tokens on this
    platform (the choice depends on each projection's shape)."""
    choices: dict[str, list[str]] = {}
    for name in PROJECTIONS:
        d_in, d_out = projection_shape(config, name)
        backend = choose_backend(tokens, settings.top_k, settings.adapters, d_in, d_out, settings.rank)
        choices.setdefault(backend, []).append(name)
    return choices


def torch_reference_module() -> ModuleType:
    """The torch reference module (imports torch; raises ConfigError, not ImportError, without it)."""
    from meteora_jax.bench import torch_reference  # noqa: PLC0415  (torch is optional)

    return torch_reference


def bench(config: LlamaConfig, settings: BenchSettings, log=print) -> list[dict]:
    """Measures every case (prefill and decode token counts); returns one row per case.

    Raises ConfigError when `settings.torch_reference` is set and torch is not installed.
    """
    torch_reference = torch_reference_module() if settings.torch_reference else None
    models = {"base": build_model(config, 0, settings.rank, 1, "xla", settings.seed)}
    models["lora"] = build_model(config, 1, settings.rank, 1, "xla", settings.seed)
    for backend in settings.backends:
        models[f"meteora[{backend}]"] = build_model(
            config, settings.adapters, settings.rank, settings.top_k, backend, settings.seed
        )
    # The base again, allocated last: where in memory a model lands moves its time by a few %
    # (measured up to ~4%), so the denominator is the faster of the two base copies.
    models["base_again"] = build_model(config, 0, settings.rank, 1, "xla", settings.seed)
    cases = [("prefill", t, 0) for t in settings.prefill_tokens]
    cases += [("decode", t, settings.decode_context) for t in settings.decode_tokens]
    rows = []
    for phase, tokens, context in tqdm(cases, desc="bench", unit="case"):
        runs, peaks = {}, {}
        for name, model in models.items():
            top_k = 1 if model.moe is None or model.moe.num_adapters == 1 else settings.top_k
            runs[name], peaks[name] = _compiled(model, tokens, context, top_k)
        gather_bytes = _reference_gather_bytes(config, settings, tokens)
        run_torch = settings.torch_reference and gather_bytes <= TORCH_GATHER_BUDGET
        if run_torch:
            runs.update(torch_reference.reference_runs(config, settings, tokens, context))
        seconds = medians(interleaved(runs, settings.repeats, settle_s=SETTLE_SECONDS))
        seconds["base"] = min(seconds["base"], seconds.pop("base_again"))
        peaks.pop("base_again")
        row = {"phase": phase, "tokens": tokens, "context": context, "adapters": settings.adapters,
               "rank": settings.rank, "top_k": settings.top_k, "base_ms": seconds["base"] * 1e3,
               "ratio": {n: s / seconds["base"] for n, s in seconds.items() if not n.startswith("torch")},
               "peak_bytes": peaks, "auto": auto_choices(config, settings, tokens)}  # fmt: skip
        if "torch_base" in seconds:
            row["torch_reference_ratio"] = seconds["torch_reference"] / seconds["torch_base"]
            meteora = [n for n in row["ratio"] if n.startswith("meteora")]
            # overhead against overhead (each to its own framework's base layer) ...
            row["speedup_vs_reference"] = {n: row["torch_reference_ratio"] / row["ratio"][n] for n in meteora}
            # ... and wall time against wall time, same shapes, same run
            row["reference_wall_ratio"] = {n: seconds["torch_reference"] / seconds[n] for n in meteora}
        if settings.torch_reference and not run_torch:
            row["torch_reference_skipped"] = (
                f"its per-token weight copies need {gather_bytes / 2**30:.1f} GiB"
            )
        rows.append(row)
        log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    ratios = ", ".join(f"{n} {r:.3f}x" for n, r in row["ratio"].items() if n != "base")
    text = (
        f"{row['phase']} {row['tokens']} tok (L={row['adapters']}, r={row['rank']}): "
        f"base {row['base_ms']:.1f} ms; {ratios}"
    )
    if "auto" in row:
        text += "; auto ran " + ", ".join(f"{b} ({', '.join(p)})" for b, p in row["auto"].items())
    if "torch_reference_ratio" in row:
        walls = ", ".join(f"{r:.2f}x {n}'s" for n, r in row["reference_wall_ratio"].items())
        text += f"; torch reference algorithm {row['torch_reference_ratio']:.3f}x its base, {walls} wall time"
    if "torch_reference_skipped" in row:
        text += f"; torch reference algorithm skipped: {row['torch_reference_skipped']}"
    return text
