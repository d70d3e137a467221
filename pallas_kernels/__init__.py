"""Pallas kernels for the MoE-LoRA op (TPU and GPU variants), each with an interpret-mode path.

Empty until the kernels land; `meteora_jax.ops` dispatches to them by platform and shape.
"""
