"""A tiny random LLaMA, saved in HF format, loaded back with `load_model`, and run once."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from flax import nnx

from meteora_jax.api import load_model
from meteora_jax.config import LlamaConfig
from meteora_jax.io.hf import save_llama
from meteora_jax.modeling.llama import LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def run(
    out_dir: str | None = None, seed: int = 0, prompt_length: int = 32, force: bool = False, log=print
) -> np.ndarray:
    """Builds, saves, reloads and runs the tiny model; returns the next-token logits (vocab,)."""
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = out_dir or os.path.join(scratch, "tiny-llama")
        t0 = time.perf_counter()
        save_llama(LlamaForCausalLM(TINY, rngs=nnx.Rngs(seed)), model_dir, overwrite=force)
        t1 = time.perf_counter()
        model = load_model(model_dir)
        t2 = time.perf_counter()
        ids = np.random.default_rng(seed).integers(0, TINY.vocab_size, (1, prompt_length))
        logits = np.asarray(model(ids).logits[0, -1])
        t3 = time.perf_counter()
        model(ids).logits.block_until_ready()
        t4 = time.perf_counter()
    log(
        f"tiny LLaMA: {TINY.num_hidden_layers} layers, hidden {TINY.hidden_size}, "
        f"{TINY.num_attention_heads} heads / {TINY.num_key_value_heads} KV heads, vocab {TINY.vocab_size}"
    )
    where = model_dir if out_dir else "(temporary folder)"
    log(f"saved to {where} in {t1 - t0:.2f}s, loaded in {t2 - t1:.2f}s")
    compiled_ms = (t4 - t3) * 1e3
    log(f"forward on {prompt_length} tokens: {t3 - t2:.2f}s with compilation, {compiled_ms:.1f} ms compiled")
    top = np.argsort(logits)[::-1][:5]
    log("next-token logits, top 5: " + ", ".join(f"id {i}: {logits[i]:.4f}" for i in top))
    return logits
