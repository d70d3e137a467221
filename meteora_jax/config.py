"""Model configuration: the LLaMA architecture as read from a Hugging Face `config.json`.

Two layouts exist in the wild: the classic one of published LLaMA checkpoints
(`rope_theta` + `rope_scaling`, often without `head_dim`) and the `rope_parameters` one
written by transformers >= 5. Both map onto one frozen `LlamaConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.inputs import is_int, read_json, validate_routing

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
        if not _positive_real(self.factor):
            raise ConfigError(f"rope scaling factor must be a finite number > 0, got {self.factor!r}")
        if self.rope_type == "llama3":
            missing = [
                name
                for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if getattr(self, name) is None
            ]
            if missing:
                raise ConfigError(f"llama3 rope scaling needs {', '.join(missing)}")
            if not (_positive_real(self.low_freq_factor) and _positive_real(self.high_freq_factor)):
                raise ConfigError("llama3 rope scaling needs finite low_freq_factor and high_freq_factor > 0")
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
        for name in ("rope_theta", "rms_norm_eps"):
            if not _positive_real(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")

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
            raise MissingFileError(f"no config.json found at {path}")
        raw = read_json(path)
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


_REQUIRED = object()


def _positive_real(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _field(raw: dict, key: str, where: str, default: Any, valid, kind: str) -> Any:
    """raw[key] (or `default` when absent), refused with the key and file unless `valid`."""
    value = raw.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"{where}: missing field {key}")
    if not valid(value):
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    return value


def _positive_int_field(raw: dict, key: str, where: str, default: Any = _REQUIRED) -> int:
    return _field(raw, key, where, default, lambda v: is_int(v) and v > 0, "a positive integer")


def _real_field(raw: dict, key: str, where: str, default: Any) -> float:
    return float(_field(raw, key, where, default, _positive_real, "a finite number > 0"))


def _token_ids(raw: dict, key: str, where: str, default: Any) -> tuple[int, ...]:
    """A token id field: an integer >= 0, a list of them, or null (no ids)."""
    value = raw.get(key, default)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ConfigError(
            f"{where}: {key} must be a token id (an integer >= 0), a list of them or null, got {value!r}"
        )
    return tuple(ids)


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
    sizes = {name: _positive_int_field(raw, name, where) for name in required}
    heads = sizes["num_attention_heads"]
    head_dim = _positive_int_field(raw, "head_dim", where, None) if raw.get("head_dim") is not None else None
    if head_dim is None:
        if sizes["hidden_size"] % heads:
            raise ConfigError(
                f"{where}: hidden_size ({sizes['hidden_size']}) is not a multiple of "
                f"num_attention_heads ({heads}) and no head_dim is given"
            )
        head_dim = sizes["hidden_size"] // heads
    kv_heads = raw.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _positive_int_field(raw, "num_key_value_heads", where)

    rope_theta, rope_scaling = _rope_from_dict(raw, where)
    bos, pad = raw.get("bos_token_id", 1), raw.get("pad_token_id")
    if bos is not None and not (is_int(bos) and bos >= 0):
        raise ConfigError(f"{where}: bos_token_id must be a token id (an integer >= 0) or null, got {bos!r}")
    if pad is not None and not is_int(pad):  # some early LLaMA conversions say -1
        raise ConfigError(f"{where}: pad_token_id must be an integer or null, got {pad!r}")
    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    fields = dict(
        rms_norm_eps=_real_field(raw, "rms_norm_eps", where, 1e-6),
        max_position_embeddings=_positive_int_field(raw, "max_position_embeddings", where, 2048),
        eos_token_id=_token_ids(raw, "eos_token_id", where, 2),
    )
    try:
        return LlamaConfig(
            **sizes,
            **fields,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=tie,
            bos_token_id=bos,
            pad_token_id=pad,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _rope_from_dict(raw: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Both layouts: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (classic)."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object")
    if params:
        theta = _real_field(params, "rope_theta", f"{where}: rope_parameters", raw.get("rope_theta", 10000.0))
        scaling, section = params, "rope_parameters"
    else:
        theta = _real_field(raw, "rope_theta", where, 10000.0)
        scaling, section = raw.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling must be an object or null")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    inner = f"{where}: {section}"
    original = scaling.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = raw.get("max_position_embeddings")  # transformers' fallback
    if original is not None and not (is_int(original) and original > 0):
        raise ConfigError(
            f"{inner}: original_max_position_embeddings must be a positive integer, got {original!r}"
        )
    freq = {
        k: _real_field(scaling, k, inner, None) if scaling.get(k) is not None else None
        for k in ("low_freq_factor", "high_freq_factor")
    }
    factor = _real_field(scaling, "factor", inner, 1.0)
    try:
        return theta, RopeScaling(rope_type, factor, **freq, original_max_position_embeddings=original)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


TOP_K = 2  # adapters per token: the paper's k, the default of every routing setting
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
    top_k: int = TOP_K
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
