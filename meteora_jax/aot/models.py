"""Model shapes to compile without their weights: the published LLaMA configurations by name, or
any HF `config.json`."""

from __future__ import annotations

import os

from meteora_jax.config import LlamaConfig
from meteora_jax.errors import ConfigError

_LLAMA3 = {
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
}
_LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip
# The HF config.json fields of the published checkpoints (meta-llama on the Hugging Face hub).
MODELS = {
    "llama3-8b": {
        **_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8,
    },
    "llama3-70b": {
        **_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    },
    "llama2-13b": {
        "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    },
    "llama3.2-1b": {
        **_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
        "max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE,
    },
}  # fmt: skip


def model_config(name: str) -> LlamaConfig:
    """A preset of `MODELS` by name, or the LlamaConfig of an HF config.json file or folder."""
    if name in MODELS:
        return LlamaConfig.from_hf({"model_type": "llama", **MODELS[name]})
    if os.path.exists(name):
        return LlamaConfig.from_hf(name)
    raise ConfigError(
        f"--model {name!r}: not one of {', '.join(MODELS)} and no such config.json file or folder"
    )
