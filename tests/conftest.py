"""Shared helpers: tiny random transformers LLaMAs saved as HF folders, and error bookkeeping.

Parity tests report their measured errors with `record_error`; they travel in each test's
`user_properties` (so they survive pytest-xdist) and are printed in the terminal summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def pytest_configure(config):
    """One on-disk cache of compiled programs for the test session (under .pytest_cache): the
    many small training runs, evaluations and generations that build the same program from fresh
    closures compile it once. Programs are keyed by their content, so a hit is the same binary."""
    import jax

    if getattr(config, "cache", None) is None:  # `-p no:cacheprovider`: compile as usual
        return
    jax.config.update("jax_compilation_cache_dir", str(config.cache.mkdir("jax-compilation-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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


# ---------------------------------------------------------------------------------------------
# PEFT adapters and a torch statement of the MeteoRA layer (docs/method.md), independent of
# meteora_jax's own readers: adapters are read back through PEFT itself.

PROJECTION_BLOCKS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def make_peft_adapter(base_dir: str, out_dir: str | os.PathLike, *, seed: int, **lora_kwargs) -> str:
    """Saves a PEFT LoRA adapter for the model in `base_dir` with random (non-zero) A and B."""
    import peft

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(os.fspath(out_dir))
    return os.fspath(out_dir)


def peft_experts(base_dir: str, adapter_dir: str) -> dict[tuple[int, str], tuple]:
    """(layer, projection) -> (A (r, in), B (out, r), scale) as PEFT itself loads the adapter."""
    import peft

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            parts = name.split(".")
            layer, proj = int(parts[parts.index("layers") + 1]), parts[-1]
            out[(layer, proj)] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                float(module.scaling["default"]),
            )
    return out


class TorchMeteoRA(torch.nn.Module):
    """docs/method.md written plainly: base(x) + sum over adapters of w_i * s_i * x A_i^T B_i^T."""

    def __init__(
        self, base: torch.nn.Linear, gate_in_l: torch.Tensor, experts: list, top_k: int, temperature
    ):
        super().__init__()
        self.base, self.gate, self.experts = base, gate_in_l, experts
        self.top_k, self.temperature = top_k, temperature

    def forward(self, x):
        y = self.base(x)
        top_z, top_i = torch.topk(x @ self.gate, self.top_k, dim=-1)
        weights = torch.softmax(top_z / self.temperature, dim=-1)
        for i, expert in enumerate(self.experts):
            if expert is None:  # this adapter does not target this module: a zero expert
                continue
            a, b, scale = expert
            w_i = (weights * (top_i == i)).sum(-1, keepdim=True)
            y = y + w_i * scale * ((x @ a.T) @ b.T)
        return y


def torch_meteora_model(base_dir: str, adapter_dirs: list[str], gates: dict, top_k: int, temperature: float):
    """A transformers LLaMA whose targeted projections are TorchMeteoRA layers.

    gates: (layer, projection) -> (in, L) array (e.g. read out of a meteora_jax model).
    """
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    experts = [peft_experts(base_dir, d) for d in adapter_dirs]
    for (layer, proj), gate in gates.items():
        block = getattr(model.model.layers[layer], PROJECTION_BLOCKS[proj])
        per_adapter = [e.get((layer, proj)) for e in experts]
        gate_t = torch.tensor(np.asarray(gate), dtype=torch.float32)
        setattr(block, proj, TorchMeteoRA(getattr(block, proj), gate_t, per_adapter, top_k, temperature))
    return model


def subprocess_env(devices: int = 8) -> dict:
    """This process's environment for a child with `devices` simulated CPU devices; the other
    XLA_FLAGS are kept, so the child compiles as the test process does (a bit-exact comparison
    between them needs the same compiler settings) and so is the session's cache of compiled
    programs: a rerun after a kill loads what the killed run or the test process compiled."""
    import jax

    device_flag = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(device_flag)]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{device_flag}={devices}"])}
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        threshold = jax.config.jax_persistent_cache_min_compile_time_secs
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(threshold)
    return env


def kill_after_first_save(cli_args: list[str], run_dir, first_save: int, total_steps: int) -> list[int]:
    """Runs `meteora-jax CLI_ARGS` in a subprocess (8 simulated devices), SIGKILLs it as soon as
    step `first_save` is on disk in `run_dir`, and returns the steps left there (checked to
    lie before `total_steps`: killed between saves)."""
    from meteora_jax.io import checkpoint

    command = [sys.executable, "-m", "meteora_jax.cli", *cli_args]
    proc = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while first_save not in checkpoint.checkpoint_steps(run_dir) and time.monotonic() < deadline:
            assert proc.poll() is None, "the training process ended before its first save"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = checkpoint.checkpoint_steps(run_dir)
    assert killed_at and killed_at[-1] < total_steps, f"the run was not killed between saves: {killed_at}"
    return killed_at
