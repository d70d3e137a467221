"""From a list of PEFT adapters to the stacked MeteoRA parameters, and back.

Per targeted projection: A (Y, L, in, R), B (Y, L, R, out), scale (Y, L), zero-padded to the
largest rank R; an adapter that does not target a (layer, projection) is a zero expert there
(zero A, B and scale). Gates are (Y, in, L). Keys are our parameter paths.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from meteora_jax.config import BLOCK_OF, PROJECTIONS, LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import ConfigError
from meteora_jax.io.peft import LoRAAdapter, LoRAModule

ParamPath = tuple[str, ...]


def param_path(projection: str, leaf: str) -> ParamPath:
    """Our parameter path of one stacked leaf (kernel, gate, lora_a, lora_b, scale) of a projection."""
    return ("layers", BLOCK_OF[projection], projection, leaf)


def moe_config_for(
    adapters: list[LoRAAdapter],
    top_k: int = MoELoRAConfig.top_k,
    temperature: float = MoELoRAConfig.temperature,
    dropout: float = MoELoRAConfig.dropout,
) -> MoELoRAConfig:
    """The mixture over `adapters`, in their order: every projection any of them targets."""
    if not adapters:
        raise ConfigError("adapters= is empty: give at least one adapter folder")
    targeted = {p for adapter in adapters for p in adapter.projections}
    return MoELoRAConfig(
        adapter_names=tuple(a.name for a in adapters),
        targets=tuple(p for p in PROJECTIONS if p in targeted),
        rank=max(a.max_rank for a in adapters),
        top_k=top_k,
        temperature=temperature,
        dropout=dropout,
    )


def stack_adapters(
    adapters: list[LoRAAdapter], config: LlamaConfig, moe: MoELoRAConfig
) -> dict[ParamPath, np.ndarray]:
    """A, B and scale stacks (float32) for every targeted projection."""
    y, n, r = config.num_hidden_layers, len(adapters), moe.rank
    out: dict[ParamPath, np.ndarray] = {}
    for proj in moe.targets:
        d_in, d_out = projection_shape(config, proj)
        a = np.zeros((y, n, d_in, r), np.float32)
        b = np.zeros((y, n, r, d_out), np.float32)
        scale = np.zeros((y, n), np.float32)
        for i, adapter in enumerate(adapters):
            for (layer, name), module in adapter.modules.items():
                if name == proj:
                    a[layer, i, :, : module.rank] = module.a.T
                    b[layer, i, : module.rank, :] = module.b.T
                    scale[layer, i] = module.scale
        out[param_path(proj, "lora_a")] = a
        out[param_path(proj, "lora_b")] = b
        out[param_path(proj, "scale")] = scale
    return out


def init_gates(config: LlamaConfig, moe: MoELoRAConfig, seed: int = 0) -> dict[ParamPath, np.ndarray]:
    """Seeded normal gates with std 1/sqrt(in), so untrained logits are O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for proj in moe.targets:
        d_in, _ = projection_shape(config, proj)
        shape = (config.num_hidden_layers, d_in, moe.num_adapters)
        out[param_path(proj, "gate")] = (rng.standard_normal(shape) / np.sqrt(d_in)).astype(np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What a fused model must remember of one adapter to write it back out (no weights)."""

    name: str
    ranks: dict[tuple[int, str], int]
    alphas: dict[tuple[int, str], float]
    use_rslora: bool = False
    source: str | None = None

    @classmethod
    def of(cls, adapter: LoRAAdapter) -> AdapterInfo:
        return cls(
            name=adapter.name,
            ranks={key: m.rank for key, m in adapter.modules.items()},
            alphas={key: m.alpha for key, m in adapter.modules.items()},
            use_rslora=adapter.use_rslora,
            source=adapter.source,
        )

    def to_json(self) -> dict:
        modules = [
            {"layer": layer, "projection": proj, "rank": rank, "alpha": self.alphas[(layer, proj)]}
            for (layer, proj), rank in sorted(self.ranks.items())
        ]
        return {"name": self.name, "use_rslora": self.use_rslora, "source": self.source, "modules": modules}

    @classmethod
    def from_json(cls, data: dict) -> AdapterInfo:
        """The inverse of `to_json`; TypeError / ValueError naming the first malformed field."""
        if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
            raise TypeError(f"an adapter entry must be an object with a modules list, got {data!r:.80}")
        name, rslora, source = data.get("name"), data.get("use_rslora", False), data.get("source")
        if not isinstance(name, str) or not name or not isinstance(rslora, bool):
            raise TypeError(f"adapter name {name!r:.80} / use_rslora {rslora!r:.20} are malformed")
        if source is not None and not isinstance(source, str):
            raise TypeError(f"adapter {name!r} has source {source!r:.80}, not a path")
        ranks, alphas = {}, {}
        for m in data["modules"]:
            if not _is_module_entry(m):
                raise ValueError(f"adapter {name!r} has a malformed module entry {m!r:.100}")
            key = (m["layer"], m["projection"])
            if key in ranks:
                raise ValueError(f"adapter {name!r} lists module {key} twice")
            ranks[key], alphas[key] = m["rank"], float(m["alpha"])
        return cls(name=name, ranks=ranks, alphas=alphas, use_rslora=rslora, source=source)


def _is_module_entry(m) -> bool:
    """A `to_json` module entry: layer >= 0, a known projection, rank >= 1, a finite alpha."""
    if not isinstance(m, dict):
        return False
    layer, proj, rank, alpha = (m.get(k) for k in ("layer", "projection", "rank", "alpha"))
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, rank))
    real = isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha)
    return ints and real and layer >= 0 and rank >= 1 and proj in PROJECTIONS


def unstack_adapters(stacks: dict[ParamPath, np.ndarray], infos: list[AdapterInfo]) -> list[LoRAAdapter]:
    """The inverse of `stack_adapters`: one LoRAAdapter per info, cut back to its true ranks."""
    adapters = []
    for i, info in enumerate(infos):
        modules = {}
        for (layer, proj), rank in info.ranks.items():
            a = stacks[param_path(proj, "lora_a")][layer, i, :, :rank].T
            b = stacks[param_path(proj, "lora_b")][layer, i, :rank, :].T
            modules[(layer, proj)] = LoRAModule(
                a=np.ascontiguousarray(a, np.float32),
                b=np.ascontiguousarray(b, np.float32),
                alpha=info.alphas[(layer, proj)],
                scale=float(stacks[param_path(proj, "scale")][layer, i]),
            )
        adapters.append(
            LoRAAdapter(name=info.name, modules=modules, use_rslora=info.use_rslora, source=info.source)
        )
    return adapters
