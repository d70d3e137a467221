"""meteora-jax: many LoRA adapters fused into one LLaMA as a token-level mixture of experts."""

from meteora_jax.api import MeteoRAModel, load_model
from meteora_jax.config import LlamaConfig, MoELoRAConfig, RopeScaling
from meteora_jax.errors import CheckpointError, ConfigError, MeteoRAError
from meteora_jax.generation import GenerateOutput, GenerationSettings, generate
from meteora_jax.io.hf import load_llama, save_llama
from meteora_jax.modeling.llama import CausalLMOutput, KVCache, LlamaForCausalLM
from meteora_jax.sharding import make_mesh

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "GenerateOutput",
    "GenerationSettings",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MeteoRAError",
    "MeteoRAModel",
    "MoELoRAConfig",
    "RopeScaling",
    "generate",
    "load_llama",
    "load_model",
    "make_mesh",
    "save_llama",
]
