"""Shared helpers: tiny random transformers LLaMAs saved as HF folders, and error bookkeeping.

Parity tests report their measured errors with `record_error`; they travel in each test's
`user_properties` (so they survive pytest-xdist) and are printed in the terminal summary.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

# Small odd sizes: a wrong reshape or transpose cannot hide behind a square matrix.
DEFAULT_CONFIG = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # Larger than LLaMA's 0.02 so logits are O(1) and attention is peaked: with near-uniform
    # attention a RoPE bug barely moves the output.
    initializer_range=0.15,
    attn_implementation="eager",
)


def make_hf_model(
    tmp_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **config_overrides,
) -> tuple[transformers.LlamaForCausalLM, str]:
    """A seeded random float32 `transformers.LlamaForCausalLM`, saved as safetensors in `tmp_dir`.

    `config_overrides` are `transformers.LlamaConfig` arguments (`rope_parameters=...` or the
    classic `rope_theta` / `rope_scaling`). RMSNorm weights are perturbed away from 1 so the
    norm scales are really checked. Returns (torch model in eval mode, folder).
    """
    config = transformers.LlamaConfig(**{**DEFAULT_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    path = os.fspath(tmp_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model, path


def torch_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Reference logits (B, T, V) as float32 numpy."""
    to_t = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        out = model(input_ids=to_t(ids), attention_mask=to_t(attention_mask), position_ids=to_t(position_ids))
    return out.logits.float().numpy()


def padded_positions(mask: np.ndarray) -> np.ndarray:
    """The position ids of a left-padded batch: each row counts its real tokens from 0."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def max_abs(a, b) -> float:
    """Largest absolute difference, computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@pytest.fixture
def record_error(record_property):
    """`record_error(label, value)`: keep a measured error for the end-of-run summary."""

    def record(label: str, value: float) -> float:
        record_property(f"err:{label}", value)
        return value

    return record


def pytest_terminal_summary(terminalreporter):
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if isinstance(key, str) and key.startswith("err:"):
                    rows.append((report.nodeid.split("::", 1)[-1], key[4:], value))
    if rows:
        terminalreporter.section("measured errors (max abs unless stated)")
        for test, label, value in sorted(rows):
            terminalreporter.write_line(f"{value:10.3e}  {test}  [{label}]")
