"""The reference implementation's MoE-LoRA algorithm in torch, for `meteora-jax bench layer`.

The MeteoRA reference gathers the chosen adapters' weights per token (T*k copies of
A (r x in) and B (out x r)) and applies them with two batched matmuls. We time one LLaMA
decoder layer with that algorithm in every projection against the same torch layer without
adapters, so its overhead is measured on the same machine, in the same run, as ours.

torch is optional (the test extra): importing this module without it raises ConfigError with
the command that installs it.
"""

from __future__ import annotations

import math

from meteora_jax.config import LlamaConfig
from meteora_jax.errors import ConfigError

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:
    raise ConfigError(
        "the torch reference algorithm needs torch: install the test extra: pip install -e '.[test]' "
        "(or leave the comparison out: `meteora-jax bench --no-torch`, BenchSettings(torch_reference=False))"
    ) from error


class GatherBmmLinear(torch.nn.Module):
    """y = x W^T + sum_j w_j s (A_j, B_j gathered per token) x, as the reference computes it."""

    def __init__(self, base: torch.nn.Linear, n_adapters: int, rank: int, top_k: int, generator):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        self.base, self.top_k = base, top_k
        self.gate = torch.randn(n_adapters, d_in, generator=generator) / math.sqrt(d_in)
        self.a = torch.randn(n_adapters, rank, d_in, generator=generator) * 0.02
        self.b = torch.randn(n_adapters, d_out, rank, generator=generator) * 0.02

    def forward(self, x):  # x: (..., in): every leading position is a token
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        t = x.shape[0]
        top_z, top_i = torch.topk(x @ self.gate.T, self.top_k, dim=-1)
        w = torch.softmax(top_z, dim=-1)  # (T, k)
        a_sel = self.a[top_i].reshape(t * self.top_k, *self.a.shape[1:])  # (T*k, r, in): per-token copies
        b_sel = self.b[top_i].reshape(t * self.top_k, *self.b.shape[1:])  # (T*k, out, r)
        x_rep = x.repeat_interleave(self.top_k, dim=0).unsqueeze(-1)  # (T*k, in, 1)
        out = torch.bmm(b_sel, torch.bmm(a_sel, x_rep)).reshape(t, self.top_k, -1)
        return (self.base(x) + (out * w.unsqueeze(-1)).sum(1)).reshape(*lead, -1)


class TorchDecoderLayer(torch.nn.Module):
    """A LLaMA decoder layer (RMSNorm, GQA attention over cached keys, SwiGLU); rope is omitted
    (elementwise, the same cost with and without adapters)."""

    def __init__(self, config: LlamaConfig, generator):
        super().__init__()
        d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
        n, k = config.num_attention_heads, config.num_key_value_heads
        self.shape = (n, k, h)
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            lin(d, n * h),
            lin(d, k * h),
            lin(d, k * h),
            lin(n * h, d),
        )
        self.gate_proj, self.up_proj, self.down_proj = lin(d, f), lin(d, f), lin(f, d)
        self.norm1, self.norm2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)

    def forward(self, x, past_k, past_v):  # x: (T, D); past: (K, S, H)
        n, k, h = self.shape
        y = self.norm1(x)
        q = self.q_proj(y).view(-1, n, h).transpose(0, 1)
        keys = torch.cat([past_k, self.k_proj(y).view(-1, k, h).transpose(0, 1)], 1)
        values = torch.cat([past_v, self.v_proj(y).view(-1, k, h).transpose(0, 1)], 1)
        keys, values = keys.repeat_interleave(n // k, 0), values.repeat_interleave(n // k, 0)
        t, s = x.shape[0], keys.shape[1]
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        attn = (
            F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(0, 1).reshape(t, n * h)
        )
        x = x + self.o_proj(attn)
        y = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def reference_runs(config: LlamaConfig, settings, tokens: int, context: int) -> dict:
    """{"torch_base": run, "torch_reference": run}: one decoder layer without / with the algorithm."""
    generator = torch.Generator().manual_seed(settings.seed)
    base = TorchDecoderLayer(config, generator).eval()
    moe = TorchDecoderLayer(config, generator).eval()
    moe.load_state_dict(base.state_dict())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        wrapped = GatherBmmLinear(
            getattr(moe, name), settings.adapters, settings.rank, settings.top_k, generator
        )
        setattr(moe, name, wrapped)
    x = torch.randn(tokens, config.hidden_size, generator=generator)
    past = torch.randn(config.num_key_value_heads, context, config.head_dim, generator=generator)

    def run(layer):
        with torch.inference_mode():
            layer(x, past, past)

    return {"torch_base": lambda: run(base), "torch_reference": lambda: run(moe)}
