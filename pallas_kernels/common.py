"""Helpers shared by the TPU and GPU kernel files: matmul precision and cost estimates."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def precision_for(dtype) -> lax.Precision | None:
    """float32 operands get full-precision matmuls (Triton would use TF32, Mosaic one bf16 pass);
    bfloat16 goes to the matrix units as is."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def cost(flops: int, bytes_accessed: int) -> pl.CostEstimate:
    """A `pl.CostEstimate` (XLA schedules around the custom call with it)."""
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(bytes_accessed))


def nbytes(*arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays)
