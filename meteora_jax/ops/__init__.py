"""The MoE-LoRA op: one function, several backends, one jnp reference as the oracle."""

from meteora_jax.ops.moe_lora import BACKENDS, lora_delta, moe_lora
from meteora_jax.ops.moe_lora_reference import moe_lora_reference

__all__ = ["BACKENDS", "lora_delta", "moe_lora", "moe_lora_reference"]
