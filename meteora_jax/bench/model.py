"""`meteora-jax bench model`: a whole model's forward through the public call, side by side.

Variants, each timed on the same prompt of `tokens` tokens (batch 1, no cache) in one run
(interleaved repeats, medians; `meteora_jax.bench.timing`):

- `base`, `meteora`: `MeteoRAModel.__call__`, what a user calls (`load_model(...)(ids)`);
- `base[program]`, `meteora[program]`: a plain `jax.jit` over `nnx.split` / `nnx.merge` of the
  same modules, the program alone: the public call should cost the same;
- `torch_base`: transformers' `LlamaForCausalLM` with the same shapes (sdpa attention);
  `torch_reference`: the same with the reference's per-token gather-bmm MoE-LoRA
  (`meteora_jax.bench.torch_reference.GatherBmmLinear`) in every projection, when torch is there;
- `matmul`, `torch_matmul`: one (tokens, hidden) x (hidden, intermediate) matmul in jax and in
  torch, the MLP's shape: how far the base's gap to torch is the matmul kernels' own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from meteora_jax.api import MeteoRAModel
from meteora_jax.bench.layer import build_model, torch_reference_module
from meteora_jax.bench.timing import REFERENCE_MIXTURE, REPEATS, SETTLE_SECONDS, interleaved, medians
from meteora_jax.config import TOP_K, LlamaConfig
from meteora_jax.errors import ConfigError
from meteora_jax.inputs import resolve_routing
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND


@dataclasses.dataclass(frozen=True)
class ModelBenchSettings:
    """L `adapters` of `rank` with top-k routing, timed at each prompt length of `tokens`."""

    adapters: int = REFERENCE_MIXTURE[0]
    rank: int = REFERENCE_MIXTURE[1]
    top_k: int = TOP_K
    tokens: tuple[int, ...] = (512,)
    backend: str = DEFAULT_BACKEND
    repeats: int = REPEATS
    torch_reference: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.repeats < 1 or self.rank < 1 or not 1 <= self.top_k <= self.adapters:
            raise ConfigError("bench model needs repeats, rank >= 1 and 1 <= top_k <= adapters")
        if not self.tokens or min(self.tokens) < 1:
            raise ConfigError(f"bench model needs token counts >= 1, got {list(self.tokens)}")


def _program(model: MeteoRAModel, ids: jax.Array):
    """The forward as a plain jit over the split module (what the public call should cost)."""
    graphdef, state = nnx.split(model.module)
    routing = resolve_routing(model.moe, ids.shape[0])
    forward = jax.jit(lambda state, ids, routing: nnx.merge(graphdef, state)(ids, routing=routing).logits)
    return lambda: forward(state, ids, routing)


def _torch_models(config: LlamaConfig, settings: ModelBenchSettings) -> dict:
    """{"torch_base": model, "torch_reference": model}: transformers' LLaMA without / with the
    reference's MoE-LoRA algorithm in every projection."""
    reference = torch_reference_module()
    import torch  # noqa: PLC0415 (present: the import above checked it)
    import transformers  # noqa: PLC0415

    torch.manual_seed(settings.seed)
    hf = {k: v for k, v in config.to_hf_dict().items() if k != "architectures"}
    hf_config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
    base = transformers.LlamaForCausalLM(hf_config).eval()
    fused = transformers.LlamaForCausalLM(hf_config).eval()
    fused.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(settings.seed)
    for layer in fused.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    wrapped = reference.GatherBmmLinear(
                        child, settings.adapters, settings.rank, settings.top_k, generator
                    )
                    setattr(parent, name, wrapped)
    return {"torch_base": base, "torch_reference": fused}


def _matmuls(config: LlamaConfig, tokens: int, seed: int) -> dict:
    """{"matmul": run, "torch_matmul": run}: one (tokens, D) x (D, F) float32 matmul each."""
    import torch  # noqa: PLC0415 (only reached once _torch_models has imported it)

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, config.hidden_size), np.float32)
    w = rng.standard_normal((config.hidden_size, config.intermediate_size), np.float32)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    tx, tw = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))  # Linear's (out, in)
    matmul = jax.jit(jnp.dot)

    def torch_matmul():
        torch.nn.functional.linear(tx, tw)

    return {"matmul": lambda: matmul(jx, jw), "torch_matmul": torch_matmul}


def _torch_run(model, ids: np.ndarray):
    import torch  # noqa: PLC0415 (only reached once _torch_models has imported it)

    tokens = torch.as_tensor(ids, dtype=torch.long)

    def run():
        with torch.inference_mode():
            model(input_ids=tokens, use_cache=False)

    return run


def bench_model(config: LlamaConfig, settings: ModelBenchSettings, log=print) -> list[dict]:
    """One row per prompt length: times (ms), and the ratios the README reports."""
    models = {
        "base": MeteoRAModel(build_model(config, 0, settings.rank, 1, "xla", settings.seed)),
        "meteora": MeteoRAModel(
            build_model(
                config, settings.adapters, settings.rank, settings.top_k, settings.backend, settings.seed
            )
        ),
    }
    torch_models = _torch_models(config, settings) if settings.torch_reference else {}
    rows = []
    for tokens in tqdm(settings.tokens, desc="bench model", unit="case"):
        ids = (
            np.random.default_rng(settings.seed).integers(3, config.vocab_size, (1, tokens)).astype(np.int32)
        )
        runs = {}
        for name, model in models.items():
            runs[name] = lambda model=model, ids=ids: model(ids).logits
            runs[f"{name}[program]"] = _program(model, jnp.asarray(ids))
        runs.update({name: _torch_run(model, ids) for name, model in torch_models.items()})
        if settings.torch_reference:
            runs.update(_matmuls(config, tokens, settings.seed))
        ms = {
            n: s * 1e3
            for n, s in medians(interleaved(runs, settings.repeats, settle_s=SETTLE_SECONDS)).items()
        }
        row = {
            "tokens": tokens, "adapters": settings.adapters, "rank": settings.rank, "top_k": settings.top_k,
            "ms": ms,
            "meteora_over_base": ms["meteora"] / ms["base"],
            "call_over_program": {n: ms[n] / ms[f"{n}[program]"] for n in models},
        }  # fmt: skip
        if settings.torch_reference:
            row["torch_base_over_ours"] = ms["torch_base"] / ms["base[program]"]
            row["torch_reference_over_torch_base"] = ms["torch_reference"] / ms["torch_base"]
            row["torch_reference_over_meteora"] = ms["torch_reference"] / ms["meteora"]
            row["torch_matmul_over_ours"] = ms["torch_matmul"] / ms["matmul"]
        rows.append(row)
        log(format_model_row(row))
    return rows


def format_model_row(row: dict) -> str:
    calls = ", ".join(f"{n} {r:.3f}x" for n, r in row["call_over_program"].items())
    text = (
        f"{row['tokens']} tok (L={row['adapters']}, r={row['rank']}, top-{row['top_k']}): base "
        f"{row['ms']['base']:.1f} ms; meteora {row['meteora_over_base']:.3f}x base; public call over "
        f"its program: {calls}"
    )
    if "torch_base_over_ours" in row:
        text += (
            f"; torch base {row['torch_base_over_ours']:.3f}x our base program; reference algorithm "
            f"{row['torch_reference_over_torch_base']:.3f}x torch base, "
            f"{row['torch_reference_over_meteora']:.2f}x meteora's wall time; one matmul of the MLP's "
            f"shape: torch {row['torch_matmul_over_ours']:.3f}x ours"
        )
    return text
