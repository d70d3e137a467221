"""Model configuration: the LLaMA architecture as read from a Hugging Face `config.json`.

Two layouts exist in the wild: the classic one of published LLaMA checkpoints
(`rope_theta` + `rope_scaling`, often without `head_dim`) and the `rope_parameters` one
written by transformers >= 5. Both map onto one frozen `LlamaConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from meteora_jax.errors import ConfigError
from meteora_jax.inputs import validate_routing

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding scaling. `factor` is read by every type; the rest only by llama3."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ConfigError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            missing = [
                name
                for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, name) is None
            ]
            if missing:
                raise ConfigError(f"llama3 rope scaling needs {', '.join(missing)}")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The LLaMA 2 / 3 / 3.1 / 3.2 architecture (every field is read by the model or the loader)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be > 0")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (G)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> LlamaConfig:
        """Reads a HF LLaMA config: a model folder, a `config.json` path, or its parsed dict.

        Raises ConfigError (a subclass of ValueError) naming the field at fault, and
        FileNotFoundError when the folder or file does not exist.
        """
        if isinstance(source, dict):
            return _from_dict(source, where="config")
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json found at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return _from_dict(raw, where=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The classic HF `config.json` layout, readable by transformers 4.x and 5.x."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            scaling = {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self.rope_scaling, name) is not None:
                    scaling[name] = getattr(self.rope_scaling, name)
            out["rope_scaling"] = scaling
        return out


def _from_dict(raw: dict[str, Any], where: str) -> LlamaConfig:
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported (only 'llama')")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not supported")
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")

    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if raw["hidden_size"] % heads:
            raise ConfigError(
                f"{where}: hidden_size ({raw['hidden_size']}) is not a multiple of "
                f"num_attention_heads ({heads}) and no head_dim is given"
            )
        head_dim = raw["hidden_size"] // heads

    rope_theta, rope_scaling = _rope_from_dict(raw, where)
    eos = raw.get("eos_token_id", 2)
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    try:
        return LlamaConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _rope_from_dict(raw: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Both layouts: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (classic)."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object")
    if params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling must be an object or null")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), None
    original = scaling.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = raw.get("max_position_embeddings")  # transformers' fallback
    try:
        return float(theta), RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=scaling.get("low_freq_factor"),
            high_freq_factor=scaling.get("high_freq_factor"),
            original_max_position_embeddings=original,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MoELoRAConfig:
    """The MeteoRA mixture: which projections carry it, how many adapters, and routing defaults.

    `rank` is the largest adapter rank (smaller ones are zero-padded); `top_k` and
    `temperature` are the defaults of the run-time routing settings; `dropout` applies to
    the LoRA input in training only.
    """

    adapter_names: tuple[str, ...]
    targets: tuple[str, ...]
    rank: int
    top_k: int = 2
    temperature: float = 1.0
    dropout: float = 0.0

    def __post_init__(self):
        if not self.adapter_names:
            raise ConfigError("a MeteoRA model needs at least one adapter")
        if len(set(self.adapter_names)) != len(self.adapter_names):
            raise ConfigError(f"adapter names must be unique, got {list(self.adapter_names)}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise ConfigError(
                f"targets must be a non-empty subset of {PROJECTIONS}, got {list(self.targets)}"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        validate_routing(self.top_k, self.temperature, len(self.adapter_names))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)


# ----------------------------------------------------------------------------- model shape facts

# The decoder block holding each projection (its module path in LLaMA and in our parameters).
BLOCK_OF = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}


def projection_shape(config: LlamaConfig, projection: str) -> tuple[int, int]:
    """(in, out) features of one projection of the base model; ConfigError for an unknown name."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = dict(zip(PROJECTIONS, ((d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)), strict=True))
    if projection not in shapes:
        raise ConfigError(f"unknown projection {projection!r} (expected one of {', '.join(PROJECTIONS)})")
    return shapes[projection]
