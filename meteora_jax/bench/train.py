"""`meteora-jax bench train`: one gate-training step against one plain-LoRA training step.

At one LLaMA-3-8B decoder layer, on the same batch, in the same run (interleaved repeats,
medians; `meteora_jax.bench.timing`):
- `lora`: what a PEFT user would otherwise run: one rank-R LoRA on all seven projections, its A
  and B trained on the LM loss (a one-adapter model with top-1 routing, weight 1, no gate term);
- `gates`: MeteoRA gate training, L adapters, top-k, gates only (LM + gate loss);
- `gates+adapters`: the same with `--train-adapters`.
Each is the full jitted step of `meteora_jax.training.step` (forward, backward, AdamW update).
Ratios are to `lora`; peak memory is XLA's accounting of each compiled step's temporaries.
`memory_only` compiles the steps and reports their memory without timing them (a 4096-token step
of an 8B layer takes minutes on 2 CPU cores; its memory takes one compile).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from meteora_jax.bench.timing import REFERENCE_MIXTURE, REPEATS, interleaved, medians
from meteora_jax.config import PROJECTIONS, TOP_K, LlamaConfig, MoELoRAConfig
from meteora_jax.errors import ConfigError
from meteora_jax.modeling.attention import DEFAULT_ATTENTION, IMPLEMENTATIONS
from meteora_jax.modeling.llama import DEFAULT_REMAT, REMAT_POLICIES, LlamaForCausalLM
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND
from meteora_jax.sharding import make_mesh
from meteora_jax.training.state import split_for_training
from meteora_jax.training.step import make_train_step
from meteora_jax.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainBenchSettings:
    """Mixtures to compare (adapters, rank) at `tokens` tokens per step (one row), top-k routing."""

    mixtures: tuple[tuple[int, int], ...] = (REFERENCE_MIXTURE, (64, 64))
    lora_rank: int = REFERENCE_MIXTURE[1]
    top_k: int = TOP_K
    tokens: int = 512
    repeats: int = REPEATS
    seed: int = 0
    backend: str = DEFAULT_BACKEND  # the MeteoRA variants' MoE-LoRA backend (the plain LoRA is always dense)
    remat: str = DEFAULT_REMAT  # what each layer keeps for the backward pass (REMAT_POLICIES)
    attention: str = DEFAULT_ATTENTION  # the attention implementation of every variant
    memory_only: bool = False  # compile and report peak memory, no timing

    def __post_init__(self):
        if self.repeats < 1 or self.tokens < 2 or self.lora_rank < 1:
            raise ConfigError("bench train needs repeats >= 1, tokens >= 2 and lora rank >= 1")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"bench train: remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
        if self.attention not in IMPLEMENTATIONS:
            raise ConfigError(f"bench train: attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        if any(n < self.top_k or r < 1 for n, r in self.mixtures):
            raise ConfigError(f"every mixture needs >= top_k={self.top_k} adapters and rank >= 1")


def _model(config: LlamaConfig, n: int, rank: int, top_k: int, settings: TrainBenchSettings, backend: str):
    moe = MoELoRAConfig(tuple(f"adapter_{i}" for i in range(n)), PROJECTIONS, rank, top_k=top_k)
    model = LlamaForCausalLM(
        config, moe, backend=backend, attention=settings.attention, rngs=nnx.Rngs(settings.seed)
    )
    lora = nnx.state(model, nnx.LoRAParam)  # B starts at zero: give every adapter real weights
    keys = iter(jax.random.split(jax.random.key(settings.seed + 1), len(jax.tree.leaves(lora))))
    nnx.update(model, jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype) * 0.02, lora))
    return model


def _batch(config: LlamaConfig, tokens: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shape = (1, tokens)
    return {
        "input_ids": jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32),
        "segment_ids": jnp.ones(shape, jnp.int32),
        "positions": jnp.arange(tokens, dtype=jnp.int32)[None],
        "lm_targets": jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32),
        "lm_weights": jnp.ones(shape, jnp.float32),
        "gate_labels": jnp.asarray(rng.integers(0, n, shape), jnp.int32),
    }


def _compiled_step(model, cfg: TrainConfig, batch: dict, mesh):
    """(run(), peak temporary bytes) of one jitted training step of `model`."""
    parts, state, frozen = split_for_training(model, cfg)
    step = make_train_step(parts, cfg, state, frozen, mesh, batch_shape=batch["input_ids"].shape)
    key = jax.random.key(0)
    compiled = step.fn.lower(frozen, state, batch, key).compile()
    memory = compiled.memory_analysis()
    peak = None if memory is None else int(memory.temp_size_in_bytes)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(frozen, holder["state"], batch, key)
        return metrics["loss"]

    return run, peak


def bench_train(config: LlamaConfig, settings: TrainBenchSettings, log=print) -> list[dict]:
    """One row per mixture: step-time ratios to the plain-LoRA step, and peak temporaries."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = []
    with jax.set_mesh(mesh):
        for n, rank in tqdm(settings.mixtures, desc="bench train", unit="mixture"):
            batch = _batch(config, settings.tokens, n, settings.seed)
            runs, peaks = {}, {}
            # what `train-lora` runs: the one adapter trained, no gate state, no gate term
            lora_cfg = TrainConfig(
                steps=1000, gate_loss_weight=0.0, top_k=1, train_gates=False, train_adapters=True,
                remat=settings.remat,
            )  # fmt: skip
            lora = _model(config, 1, settings.lora_rank, 1, settings, "xla")
            runs["lora"], peaks["lora"] = _compiled_step(lora, lora_cfg, batch, mesh)
            for name, train_adapters in (("gates", False), ("gates+adapters", True)):
                cfg = TrainConfig(
                    steps=1000, top_k=settings.top_k, train_adapters=train_adapters, remat=settings.remat
                )
                model = _model(config, n, rank, settings.top_k, settings, settings.backend)
                runs[name], peaks[name] = _compiled_step(model, cfg, batch, mesh)
            row = {"adapters": n, "rank": rank, "top_k": settings.top_k, "tokens": settings.tokens,
                   "lora_rank": settings.lora_rank, "backend": settings.backend, "remat": settings.remat,
                   "attention": settings.attention, "peak_bytes": peaks}  # fmt: skip
            if not settings.memory_only:
                seconds = medians(interleaved(runs, settings.repeats))
                row["lora_ms"] = seconds["lora"] * 1e3
                row["ratio"] = {k: s / seconds["lora"] for k, s in seconds.items()}
            rows.append(row)
            log(format_train_row(row))
    return rows


def format_train_row(row: dict) -> str:
    peaks = ", ".join(f"{k} {b / 2**20:.0f} MiB" for k, b in row["peak_bytes"].items() if b is not None)
    head = (
        f"train step, {row['tokens']} tokens, L={row['adapters']} x r{row['rank']} top-{row['top_k']} "
        f"[{row['backend']}, remat {row['remat']}, attention {row['attention']}]: "
    )
    if "ratio" not in row:
        return head + f"peak temporaries: {peaks}"
    ratios = ", ".join(f"{k} {r:.3f}x" for k, r in row["ratio"].items() if k != "lora")
    return (
        head + f"plain LoRA r{row['lora_rank']} {row['lora_ms']:.0f} ms; {ratios}; peak temporaries: {peaks}"
    )
