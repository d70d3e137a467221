"""PEFT LoRA adapters for a LLaMA base: a neutral numpy form, and reading / writing PEFT folders.

MeteoRA stacks many independently trained PEFT adapters, so reading one must reproduce exactly
what `peft.PeftModel.from_pretrained` would compute with it, or refuse. Reproduced (PEFT 0.21):

- targeting: `check_target_module_exists` (exact name, `.suffix`, regex `fullmatch`,
  `layers_to_transform` + `layers_pattern`, `exclude_modules`), "all-linear", and PEFT's
  LLaMA default `["q_proj", "v_proj"]` when `target_modules` is null;
- per-module rank / alpha: `get_pattern_key` over `rank_pattern` / `alpha_pattern`, first
  matching key in file order, keyed on module names like `model.layers.3.self_attn.q_proj`;
- scaling: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora` (`LoraLayer.update_layer`).

Everything a plain `y += s * x A^T B^T` cannot express is refused with the folder and reason:
DoRA, biases, modules_to_save, embedding / lm_head LoRA, inits that rewrite the base weights
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), and other LoRA variants. Stricter than PEFT, which
only warns: a targeted module without tensors, or tensors for an untargeted module, is an
error (PEFT would silently run such a module with its random / zero initial weights).

PEFT's own functions are not called: PEFT needs torch, which reading an adapter here must not;
tests/test_peft_io.py holds ours equal to PEFT's matching over every LLaMA module name.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meteora_jax.config import BLOCK_OF, PROJECTIONS, LlamaConfig, projection_shape
from meteora_jax.errors import CheckpointError, ConfigError, MeteoRAError, MissingFileError
from meteora_jax.inputs import is_int, read_json
from meteora_jax.io.files import raise_problems
from meteora_jax.io.safetensors_io import SafetensorsFile

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"], used when target_modules is null.
DEFAULT_TARGETS = ("q_proj", "v_proj")
_LOW_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # ml_dtypes floats, numpy kind "V"
# Scales live in float32 (`AdapterScale`): a larger one would be Inf there, and so would the logits.
MAX_SCALE = float(np.finfo(np.float32).max)


def module_name(layer: int, projection: str) -> str:
    """The module's name in `LlamaForCausalLM`, as PEFT's patterns see it."""
    return f"model.layers.{layer}.{BLOCK_OF[projection]}.{projection}"


def peft_key(layer: int, projection: str, part: str) -> str:
    """PEFT's saved key (no adapter name) of `part` "A" or "B" of one module."""
    return f"base_model.model.{module_name(layer, projection)}.lora_{part}.weight"


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAModule:
    """One adapted projection: `a` (r, in) and `b` (out, r) as PEFT stores them, float32."""

    a: np.ndarray
    b: np.ndarray
    alpha: float
    scale: float

    def __post_init__(self):
        a, b = np.asarray(self.a, np.float32), np.asarray(self.b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ConfigError(
                f"LoRA weights need a (r, in) and b (out, r) with one r > 0, got a {a.shape}, b {b.shape}"
            )
        if not (math.isfinite(self.alpha) and abs(self.scale) <= MAX_SCALE):
            raise ConfigError(
                f"LoRA alpha and scale must be finite (scale at most {MAX_SCALE:g} in magnitude, float32's "
                f"range), got {self.alpha} and {self.scale}"
            )
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def from_alpha(cls, a, b, alpha: float, use_rslora: bool = False) -> LoRAModule:
        """A module whose scale follows PEFT's rule for `alpha` and the rank of `a`."""
        return cls(a, b, alpha, lora_scaling(alpha, np.shape(a)[0], use_rslora))

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A PEFT LoRA adapter of a LLaMA: (layer, projection) -> weights; untargeted modules are absent."""

    name: str
    modules: dict[tuple[int, str], LoRAModule]
    use_rslora: bool = False
    source: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"an adapter name must be a non-empty string, got {self.name!r}")
        if not self.modules:
            raise ConfigError(f"adapter {self.name!r} has no LoRA modules")
        problems = []
        for key, module in self.modules.items():
            ok = isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and key[0] >= 0
            if not ok or key[1] not in PROJECTIONS:
                problems.append(f"module key {key!r} is not (layer >= 0, one of {', '.join(PROJECTIONS)})")
            elif not isinstance(module, LoRAModule):
                problems.append(f"module {key} is a {type(module).__name__}, not a LoRAModule")
            elif not math.isclose(
                module.scale, lora_scaling(module.alpha, module.rank, self.use_rslora), rel_tol=1e-6
            ):
                # PEFT recomputes the scale from alpha and r, so a free-standing scale could not be saved.
                problems.append(
                    f"module {key} has scale {module.scale}, but alpha {module.alpha} and rank "
                    f"{module.rank} give {lora_scaling(module.alpha, module.rank, self.use_rslora)}"
                    f"{' (rsLoRA)' if self.use_rslora else ''}"
                )
        raise_problems(ConfigError, f"adapter {self.name!r}", problems)
        order = {p: i for i, p in enumerate(PROJECTIONS)}
        object.__setattr__(
            self, "modules", dict(sorted(self.modules.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])))
        )

    @property
    def projections(self) -> tuple[str, ...]:
        """The projections this adapter targets in any layer, in PROJECTIONS order."""
        targeted = {p for _, p in self.modules}
        return tuple(p for p in PROJECTIONS if p in targeted)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The parts of a PEFT LoraConfig that decide which modules are adapted, and how."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | int | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _modifies_base(init: Any) -> bool:
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga"))


# Settings whose non-default value changes what the adapter computes beyond y += s * x A^T B^T.
_REFUSED_SETTINGS = (
    ("use_dora", bool, "DoRA (use_dora=true) is not supported"),
    ("bias", lambda v: v not in (None, "none"), "bias={v!r} trains base biases; only 'none' is supported"),
    ("modules_to_save", bool, "modules_to_save={v!r} stores whole base modules; not supported"),
    ("fan_in_fan_out", bool, "fan_in_fan_out=true (transposed Conv1D weights) does not fit LLaMA"),
    ("lora_bias", bool, "lora_bias=true (a bias on lora_B) is not supported"),
    ("target_parameters", bool, "target_parameters (LoRA on raw parameters) is not supported"),
    ("trainable_token_indices", bool, "trainable_token_indices (trained embedding rows) is not supported"),
    ("layer_replication", bool, "layer_replication changes the base model's layers; not supported"),
    ("alora_invocation_tokens", bool, "activated LoRA (alora_invocation_tokens) is not supported"),
    ("use_qalora", bool, "QALoRA (use_qalora=true) is not supported"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora) is not supported"),
    ("arrow_config", bool, "Arrow routing (arrow_config) is not supported"),
    ("kasa_config", bool, "KaSA (kasa_config) is not supported"),
    ("velora_config", bool, "VeLoRA (velora_config) is not supported"),
    ("monteclora_config", bool, "MonteCLoRA (monteclora_config) is not supported"),
    (
        "init_lora_weights",
        _modifies_base,
        "init_lora_weights={v!r} makes PEFT rewrite the base weights when it loads the adapter; convert it "
        "first with save_pretrained(..., path_initial_model_for_weight_conversion=...)",
    ),
)


def _is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _str_or_list(raw: dict, field: str, problems: list[str]) -> tuple[str, ...] | str | None:
    value = raw.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    problems.append(f"{field} must be a string, a list of strings or null, got {value!r}")
    return None


def _check_regex(pattern: str, field: str, problems: list[str]) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        problems.append(f"{field} {pattern!r} is not a valid regular expression ({e})")


def _parse_settings(raw: Any, where: str) -> _Settings:
    """Validates an adapter_config.json dict; raises one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    problems: list[str] = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    for field, refused, message in _REFUSED_SETTINGS:
        value = raw.get(field)
        if value is not None and refused(value):
            problems.append(message.format(v=value))
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not is_int(r) or r <= 0:
        problems.append(f"r must be a positive integer, got {r!r}")
    if not _is_number(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora must be true or false, got {use_rslora!r}")

    targets = _str_or_list(raw, "target_modules", problems)
    regex_targets = isinstance(targets, str)  # "all-linear" included, as in LoraConfig.__post_init__
    if targets is None:
        targets = DEFAULT_TARGETS
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = PROJECTIONS  # every nn.Linear of LlamaForCausalLM except the output layer
    elif isinstance(targets, str):
        _check_regex(targets, "target_modules", problems)
    exclude = _str_or_list(raw, "exclude_modules", problems)
    if isinstance(exclude, str):
        _check_regex(exclude, "exclude_modules", problems)
    layers = raw.get("layers_to_transform")
    if isinstance(layers, list) and all(is_int(v) for v in layers):
        layers = tuple(layers)
    elif layers is not None and not is_int(layers):
        problems.append(f"layers_to_transform must be an integer, a list of integers or null, got {layers!r}")
    raw_pattern = _str_or_list(raw, "layers_pattern", problems)
    if regex_targets and (layers is not None or raw_pattern is not None):
        problems.append(
            "layers_to_transform / layers_pattern cannot be used with a regex target_modules (PEFT)"
        )
    if raw_pattern and layers is None:
        problems.append("layers_pattern needs layers_to_transform (PEFT)")
    # PEFT: an empty layers_pattern ("" or []) means any layer; [""] is a (never matching) pattern.
    layers_pattern = (
        None if not raw_pattern else (raw_pattern,) if isinstance(raw_pattern, str) else raw_pattern
    )

    patterns = {}
    for field, valid, kind in (
        ("rank_pattern", lambda v: is_int(v) and v > 0, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        value = raw.get(field) or {}
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            problems.append(f"{field} must map module patterns to {kind}, got {value!r}")
            value = {}
        for key in value:
            _check_regex(rf"(.*\.)?({key})$", f"{field} key", problems)
        patterns[field] = value
    raise_problems(ConfigError, where, problems)
    return _Settings(r, float(alpha), use_rslora, targets, exclude, layers, layers_pattern, **patterns)


def _is_targeted(s: _Settings, key: str) -> bool:
    """PEFT's `check_target_module_exists` (tuners_utils.py) for one module name."""
    if isinstance(s.exclude_modules, str):
        if re.fullmatch(s.exclude_modules, key):
            return False
    elif s.exclude_modules and (
        key in s.exclude_modules or any(key.endswith(f".{e}") for e in s.exclude_modules)
    ):
        return False
    if isinstance(s.target_modules, str):
        return re.fullmatch(s.target_modules, key) is not None
    if key in s.target_modules:
        return True  # an exact name bypasses layers_to_transform, as in PEFT
    if not any(key.endswith(f".{t}") for t in s.target_modules):
        return False
    wanted = s.layers_to_transform
    if wanted is None or wanted == ():
        return True
    if not s.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
    else:
        for pattern in s.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's `get_pattern_key`: the first pattern key matching the end of the module name."""
    for k in pattern:
        if re.match(rf"(.*\.)?({k})$", key):
            return pattern[k]
    return default


def _llama_modules(num_layers: int):
    """Every named submodule of transformers' LlamaForCausalLM: (name, (layer, projection) or None)."""
    yield from (("model", None), ("model.embed_tokens", None), ("model.layers", None))
    for i in range(num_layers):
        yield from ((f"model.layers.{i}", None), (f"model.layers.{i}.self_attn", None))
        yield from ((module_name(i, p), (i, p)) for p in PROJECTIONS[:4])
        yield f"model.layers.{i}.mlp", None
        yield from ((module_name(i, p), (i, p)) for p in PROJECTIONS[4:])
        for sub in ("mlp.act_fn", "input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{sub}", None
    yield from (("model.norm", None), ("model.rotary_emb", None), ("lm_head", None))


def _targets(s: _Settings, num_layers: int, where: str) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, alpha) for every module the settings target."""
    targets, problems, too_large = {}, [], []
    wanted = s.layers_to_transform
    wanted = () if wanted is None else (wanted,) if isinstance(wanted, int) else wanted
    outside = [i for i in wanted if not 0 <= i < num_layers]
    if outside:
        raise ConfigError(
            f"{where}: layers_to_transform {list(outside)} lies outside the base model, which has "
            f"{num_layers} layers (0 to {num_layers - 1})"
        )
    for name, slot in _llama_modules(num_layers):
        if not _is_targeted(s, name):
            continue
        if slot is None:
            why = (
                "embedding / lm_head LoRA is not supported"
                if name in ("model.embed_tokens", "lm_head")
                else "only the 7 linear projections can be adapted"
            )
            problems.append(f"target_modules matches {name} ({why})")
            continue
        rank, alpha = (
            _pattern_value(s.rank_pattern, name, s.r),
            float(_pattern_value(s.alpha_pattern, name, s.lora_alpha)),
        )
        if abs(lora_scaling(alpha, rank, s.use_rslora)) > MAX_SCALE:
            too_large.append((name, rank, alpha))
        else:
            targets[slot] = (rank, alpha)
    if too_large:
        name, rank, alpha = too_large[0]
        problems.append(
            f"lora_alpha {alpha:g} with r {rank} gives {name} (and {len(too_large) - 1} more modules) the "
            f"scale {lora_scaling(alpha, rank, s.use_rslora):g}, beyond float32's range (logits would be Inf)"
        )
    if not targets and not problems:
        problems.append(f"target_modules {s.target_modules!r} matches none of the LLaMA projections")
    raise_problems(ConfigError, where, problems)
    return targets


def adapter_targets(raw: Any, num_layers: int, where: str) -> dict[tuple[int, str], tuple[int, float]]:
    """The modules an `adapter_config.json` dict adapts under PEFT's rules, in a base of `num_layers`.

    Returns (layer, projection) -> (rank, alpha); raises one ConfigError listing every problem.
    """
    return _targets(_parse_settings(raw, where), num_layers, where)


_MODULE_ALTERNATIVES = "|".join(rf"{BLOCK_OF[p]}\.{p}" for p in PROJECTIONS)
# A LoRA weight of one projection; PEFT may insert an adapter name (`lora_A.default.weight`), and
# transformers' own PEFT integration saves without the `base_model.model.` prefix.
LORA_KEY = re.compile(
    rf"(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<module>{_MODULE_ALTERNATIVES})"
    rf"\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight"
)
# Keys of unsupported variants: refused by name, whatever adapter_config.json claims.
REFUSED_KEYS = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (r".*\.lora_magnitude_vector(\..+)?", "a DoRA magnitude vector (DoRA is not supported)"),
        (r".*\.lora_embedding_[AB](\..+)?", "embedding LoRA (not supported)"),
        (r".*\.lora_[AB](\.[^.]+)?\.bias", "a LoRA bias (lora_bias is not supported)"),
        (r".*\.(modules_to_save|original_module)\..*", "a modules_to_save copy (not supported)"),
        (r".*\.lora_[AB](\.[^.]+)?\.weight", "LoRA on a module that is not one of the 7 LLaMA projections"),
        (
            r"(base_model\.model\.)?(model|lm_head)\b.*\.weight",
            "a base weight (modules_to_save or resized vocabulary)",
        ),
        (r".*\.bias", "a trained bias (only bias='none' is supported)"),
    )
)


def _index_keys(names, num_layers: int) -> tuple[dict[tuple[int, str], dict[str, str]], list[str]]:
    """Maps every tensor name to (layer, projection) and part A / B; problems for all others."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    problems = []
    for key in names:
        match = LORA_KEY.fullmatch(key)
        if match is None:
            reason = next((why for pattern, why in REFUSED_KEYS if pattern.fullmatch(key)), None)
            problems.append(f"tensor {key} is {reason}" if reason else f"unexpected tensor {key}")
            continue
        layer, projection, part = int(match["layer"]), match["module"].split(".")[1], match["part"]
        if layer >= num_layers:
            problems.append(f"tensor {key} is for layer {layer}, but the base model has {num_layers} layers")
            continue
        slot = found.setdefault((layer, projection), {})
        if part in slot:
            problems.append(
                f"tensors {slot[part]} and {key} both hold lora_{part} of {module_name(layer, projection)}"
            )
        slot[part] = key
    return found, problems


def _check_module(tensors, slot, parts, target, config: LlamaConfig) -> list[str]:
    """Shape, dtype and rank problems of one module's tensors."""
    name = module_name(*slot)
    if target is None:
        return [f"tensors {', '.join(parts.values())} adapt {name}, which {CONFIG_FILE} does not target"]
    missing = [f"lora_{p}" for p in "AB" if p not in parts]
    if missing:
        return [f"module {name} (targeted by {CONFIG_FILE}) has no {' / '.join(missing)} tensor"]
    rank, problems = target[0], []
    fan_in, fan_out = projection_shape(config, slot[1])
    shape_a, shape_b = tensors[parts["A"]].shape, tensors[parts["B"]].shape
    # axis: the feature axis fixed by the base model; the other one is the rank, checked below.
    for key, got, axis, want in (
        (parts["A"], shape_a, 1, (rank, fan_in)),
        (parts["B"], shape_b, 0, (fan_out, rank)),
    ):
        dtype = tensors[key].dtype
        if dtype.kind != "f" and dtype.name not in _LOW_FLOATS:
            problems.append(f"tensor {key} has dtype {dtype}, expected a float type")
        if len(got) != 2 or got[axis] != want[axis]:
            problems.append(f"tensor {key} has shape {got}, expected {want} for this base model")
    if not problems and not (shape_a[0] == shape_b[1] == rank):
        problems.append(
            f"module {name} has rank {shape_a[0]} (lora_A) / {shape_b[1]} (lora_B), but {CONFIG_FILE} "
            f"(r, rank_pattern) gives rank {rank}"
        )
    return problems


def _load_bin(path: str) -> dict[str, np.ndarray]:
    """A legacy pickled state dict, only through torch's restricted `weights_only` unpickler."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: legacy .bin adapters need torch to be read safely (torch.load with weights_only=True); "
            "install torch, or convert the adapter to safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler raises several types for foreign objects
        raise CheckpointError(f"{path}: cannot be loaded as a plain tensor state dict ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return {
        k: (v.to(torch.float32) if v.is_floating_point() else v).detach().numpy() for k, v in state.items()
    }


def _read_settings(folder: str) -> _Settings:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        hint = (
            " (it looks like a full model folder)"
            if os.path.isfile(os.path.join(folder, "config.json"))
            else ""
        )
        raise ConfigError(f"{folder} is not a PEFT adapter folder: no {CONFIG_FILE}{hint}")
    return _parse_settings(read_json(path), where=path)


def read_adapter(path: str | os.PathLike, config: LlamaConfig, name: str | None = None) -> LoRAAdapter:
    """Reads a PEFT LoRA adapter folder made for the base model described by `config`.

    `name` defaults to the folder's name. Raises FileNotFoundError for a missing folder or
    weights file, ConfigError for an unsupported adapter_config.json and CheckpointError
    naming every missing, unexpected, mis-shaped or non-finite tensor.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise MissingFileError(f"adapter folder {folder} does not exist")
    name = name if name is not None else os.path.basename(os.path.normpath(os.path.abspath(folder)))
    settings = _read_settings(folder)
    targets = _targets(settings, config.num_hidden_layers, where=os.path.join(folder, CONFIG_FILE))
    weights = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.isfile(weights):
        file = SafetensorsFile(weights)
        tensors = {key: file.get(key) for key in file.names()}  # memory-mapped views, no copies
    elif os.path.isfile(os.path.join(folder, BIN_FILE)):
        weights = os.path.join(folder, BIN_FILE)
        tensors = _load_bin(weights)
    else:
        raise MissingFileError(f"no {SAFETENSORS_FILE} or {BIN_FILE} in adapter folder {folder}")
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors (an empty adapter)")

    found, problems = _index_keys(tensors, config.num_hidden_layers)
    if not found:
        problems.append("no LoRA weights of the LLaMA projections")
    modules = {}
    for slot in sorted(found.keys() | targets.keys()):
        parts, target = found.get(slot, {}), targets.get(slot)
        module_problems = _check_module(tensors, slot, parts, target, config)
        if not module_problems:
            a, b = (np.array(tensors[parts[p]], dtype=np.float32) for p in "AB")
            bad = [parts[p] for p, w in (("A", a), ("B", b)) if not np.isfinite(w).all()]
            module_problems = [f"tensor {k} has NaN or Inf values" for k in bad]
            modules[slot] = LoRAModule(
                a, b, target[1], lora_scaling(target[1], target[0], settings.use_rslora)
            )
        problems += module_problems
    raise_problems(CheckpointError, weights, problems)
    return LoRAAdapter(name, modules, use_rslora=settings.use_rslora, source=os.path.abspath(folder))


def read_adapters(specs: Sequence[str] | Mapping[str, str], config: LlamaConfig) -> list[LoRAAdapter]:
    """Reads adapters in order: a list of folders (named after them) or {name: folder}.

    Every adapter is checked before anything is raised, so one error reports them all.
    """
    if isinstance(specs, str | os.PathLike):
        raise ConfigError(
            f"read_adapters wants a list of folders or a {{name: folder}} mapping, got {specs!r}"
        )
    if isinstance(specs, Mapping):
        pairs = [(str(k), os.fspath(v)) for k, v in specs.items()]
    else:
        pairs = [(os.path.basename(os.path.normpath(os.path.abspath(s))), os.fspath(s)) for s in specs]
    counts = collections.Counter(n for n, _ in pairs)
    duplicates = [f"{n!r} ({', '.join(p for m, p in pairs if m == n)})" for n in counts if counts[n] > 1]
    if duplicates:
        raise ConfigError(
            f"duplicate adapter names: {'; '.join(duplicates)} (pass a {{name: folder}} mapping)"
        )
    adapters, errors = [], []
    for name, folder in pairs:
        try:
            adapters.append(read_adapter(folder, config, name=name))
        except (MeteoRAError, FileNotFoundError) as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kinds = {type(e) for e in errors}
        cls = kinds.pop() if len(kinds) == 1 else MeteoRAError
        cls = cls if issubclass(cls, MeteoRAError) else MeteoRAError
        raise cls(
            f"{len(errors)} of {len(pairs)} adapters cannot be read:\n" + "\n".join(str(e) for e in errors)
        )
    return adapters
