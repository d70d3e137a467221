"""Hugging Face LLaMA checkpoints (`config.json` + safetensors) in and out of our NNX model.

The mapping is one declarative table of HF key templates -> parameter paths. Loading builds
the target with `nnx.eval_shape`, checks every tensor against it (collecting all problems
and raising once), then materialises each parameter straight into its final sharding,
reading only the slices each device needs from memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.errors import CheckpointError, MissingFileError, OutputExistsError
from meteora_jax.inputs import read_json
from meteora_jax.io import checksums
from meteora_jax.io.files import raise_problems, staged_directory, write_text_atomic
from meteora_jax.io.safetensors_io import FLOAT_DTYPES, SafetensorsFile, save_file
from meteora_jax.modeling.attention import DEFAULT_ATTENTION
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.modeling.meteora_linear import BASE_PARAMS
from meteora_jax.ops.moe_lora import DEFAULT_BACKEND
from meteora_jax.sharding import active_mesh, variable_sharding

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One HF key template and our parameter path; `{layer}` marks a stacked layer tensor."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(re.escape("{layer}"), r"(\d+)"))


def _rules() -> tuple[KeyRule, ...]:
    rules = [
        KeyRule("model.embed_tokens.weight", ("embed_tokens",)),
        KeyRule("model.norm.weight", ("norm", "scale")),
        KeyRule("lm_head.weight", ("lm_head", "kernel"), transpose=True),
    ]
    for block, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
        for name in names:
            rules.append(
                KeyRule(
                    f"model.layers.{{layer}}.{block}.{name}.weight",
                    ("layers", block, name, "kernel"),
                    transpose=True,
                )
            )
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(KeyRule(f"model.layers.{{layer}}.{name}.weight", ("layers", name, "scale")))
    return tuple(rules)


HF_KEY_TABLE: tuple[KeyRule, ...] = _rules()
# Buffers some LLaMA-2 era checkpoints carry; they are recomputed from the config.
IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def weight_files(base_dir: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to its open file, from `model.safetensors` or the shard index."""
    if not os.path.isdir(base_dir):
        raise MissingFileError(f"model folder {base_dir} does not exist")
    index_path = os.path.join(base_dir, INDEX_FILE)
    single_path = os.path.join(base_dir, WEIGHTS_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_weight_map(index_path)
        files: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(base_dir, name)
            if os.path.dirname(os.path.normpath(name)) or not os.path.isfile(path):
                raise CheckpointError(f"{index_path}: shard {name!r} is missing from {base_dir}")
            files[name] = SafetensorsFile(path)
        by_key = {}
        for key, name in weight_map.items():
            if key not in files[name].names():
                raise CheckpointError(f"{index_path}: tensor {key} is not in shard {name}")
            by_key[key] = files[name]
        for name, file in files.items():
            for key in file.names():
                if weight_map.get(key) != name:
                    raise CheckpointError(f"{file.path}: tensor {key} is not listed in {INDEX_FILE}")
        return by_key
    if os.path.isfile(single_path):
        file = SafetensorsFile(single_path)
        return {key: file for key in file.names()}
    others = [n for n in os.listdir(base_dir) if n.endswith((".bin", ".pt", ".pth"))]
    hint = (
        f" (found {', '.join(sorted(others))}: convert pickled torch weights to safetensors first)"
        if others
        else ""
    )
    raise MissingFileError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {base_dir}{hint}")


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The `weight_map` of a shard index: tensor name -> shard file name, both strings."""
    index = read_json(index_path, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        got = "nothing" if weight_map is None else f"a {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index_path}: not a valid safetensors index (weight_map must map tensor names to shard files, "
            f"got {got})"
        )
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(
            f"{index_path}: weight_map gives tensor {bad[0]} the shard {weight_map[bad[0]]!r} "
            "(expected a file name)"
        )
    return weight_map


def _plan(
    config: LlamaConfig, files: dict[str, SafetensorsFile], abstract: nnx.State, extra: dict, where: str
):
    """Matches file tensors to parameters; returns {param path: (rule, keys per layer)}.

    Variables the HF table does not cover (gates, adapters) must be in `extra`, with their shape.
    """
    problems: list[str] = []
    sources: dict[tuple, dict[int | None, str]] = {}
    rule_of_path = {rule.ours: rule for rule in HF_KEY_TABLE}
    for key in files:
        if IGNORED_KEYS.fullmatch(key) or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        for rule in HF_KEY_TABLE:
            match = rule.pattern.fullmatch(key)
            if match:
                layer = int(match.group(1)) if rule.stacked else None
                if layer is not None and layer >= config.num_hidden_layers:
                    problems.append(f"unexpected tensor {key} (config has {config.num_hidden_layers} layers)")
                else:
                    sources.setdefault(rule.ours, {})[layer] = key
                break
        else:
            problems.append(f"unexpected tensor {key}")

    plan = {}
    for path, var in nnx.to_flat_state(abstract):
        path = tuple(str(p) for p in path)
        shape = var.get_value().shape
        if path not in rule_of_path:
            if path not in extra or extra[path].shape != shape:
                found = extra[path].shape if path in extra else "nothing"
                raise ValueError(f"internal: no value for {'/'.join(path)} {shape}, got {found}")
            continue
        rule = rule_of_path[path]
        layers = range(config.num_hidden_layers) if rule.stacked else [None]
        one_shape = shape[1:] if rule.stacked else shape
        torch_shape = tuple(reversed(one_shape)) if rule.transpose else tuple(one_shape)
        found = sources.get(path, {})
        keys = []
        for layer in layers:
            key = rule.hf.format(layer=layer)
            if layer not in found:
                problems.append(f"missing tensor {key}")
                continue
            got = files[key].shape(key)
            if got != torch_shape:
                problems.append(f"tensor {key} has shape {got}, expected {torch_shape}")
            elif files[key].dtype(key) not in FLOAT_DTYPES:
                problems.append(f"tensor {key} has dtype {files[key].dtype(key)}, expected a float type")
            keys.append(key)
        plan[path] = (rule, keys)
    raise_problems(CheckpointError, f"{where}: weights do not match {CONFIG_FILE}", problems, max_shown=8)
    return plan


def _read(files, key: str, transpose: bool, index: tuple, dtype) -> np.ndarray:
    view = files[key].get(key)
    view = view.T if transpose else view
    return np.asarray(view[index], dtype=dtype)


def load_llama(
    base_dir: str,
    moe: MoELoRAConfig | None = None,
    extra: dict[tuple[str, ...], np.ndarray] | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    scan_layers: bool = True,
    backend: str = DEFAULT_BACKEND,
    attention: str = DEFAULT_ATTENTION,
    mesh: jax.sharding.Mesh | None = None,
) -> LlamaForCausalLM:
    """Loads a HF LLaMA folder into a `LlamaForCausalLM`, with MeteoRA layers when `moe` is given.

    extra: values of the variables that are not in the HF files (gates, stacked adapters,
    scales), keyed by parameter path. Parameters land in `param_dtype` (default: `dtype`;
    adapter scales stay float32), sharded by the logical rules over `mesh` (default: the
    mesh set by `jax.set_mesh`, else one device). Raises FileNotFoundError for a missing
    folder / config / weights and CheckpointError naming every missing, unexpected or
    mis-shaped tensor.
    """
    base_dir = os.fspath(base_dir)
    if not os.path.isdir(base_dir):
        raise MissingFileError(f"model folder {base_dir} does not exist")
    config = LlamaConfig.from_hf(base_dir)
    files = weight_files(base_dir)
    param_dtype = dtype if param_dtype is None else param_dtype
    mesh = mesh if mesh is not None else active_mesh()

    extra = extra or {}
    abstract_model = nnx.eval_shape(
        lambda: LlamaForCausalLM(
            config,
            moe,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            backend=backend,
            attention=attention,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, abstract = nnx.split(abstract_model)
    plan = _plan(config, files, abstract, extra, where=base_dir)

    def materialise(path, var):
        path = tuple(str(p) for p in path)
        shape, np_dtype = var.get_value().shape, np.dtype(var.get_value().dtype)
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = variable_sharding(var, mesh)
        if path not in plan:
            value = extra[path]
            return var.replace(
                jax.make_array_from_callback(shape, sharding, lambda i: value[i].astype(np_dtype))
            )
        rule, keys = plan[path]

        def shard(index: tuple) -> np.ndarray:
            if not rule.stacked:
                return _read(files, keys[0], rule.transpose, index, np_dtype)
            layers = range(shape[0])[index[0]]
            return np.stack([_read(files, keys[y], rule.transpose, index[1:], np_dtype) for y in layers])

        return var.replace(jax.make_array_from_callback(shape, sharding, shard))

    flat = [(p, materialise(p, v)) for p, v in nnx.to_flat_state(abstract)]
    _refuse_non_finite(flat, plan, where=base_dir)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnames="stacked")
def _all_finite(values: tuple, stacked: tuple[bool, ...]) -> tuple:
    """Per value: (Y,) bools for a value stacked over layers, else one bool: all elements finite."""
    return tuple(
        jnp.isfinite(v).reshape(v.shape[0], -1).all(axis=1) if s else jnp.isfinite(v).all()
        for v, s in zip(values, stacked, strict=True)
    )


def _refuse_non_finite(flat: list, plan: dict, where: str) -> None:
    """CheckpointError naming every tensor (and layer) holding NaN or Inf once placed in its dtype.

    Checked on device after placement, in one jitted reduction over all parameters, so a value
    that overflows when cast to the parameter dtype (float16) is caught too. Cost on 2 CPU
    cores: about the time of reading the tensor from the page cache (1 GB of bfloat16 in ~0.4 s);
    on an accelerator it runs at memory bandwidth. flat: (path, variable) pairs; plan: `_plan`'s.
    """
    paths = [tuple(str(p) for p in path) for path, _ in flat]
    values = tuple(var.get_value() for _, var in flat)
    stacked = tuple(path not in plan or plan[path][0].stacked for path in paths)
    problems = []
    for path, value, finite in zip(paths, values, _all_finite(values, stacked), strict=True):
        for y in np.flatnonzero(~np.atleast_1d(checksums.host_array(finite))):
            if path in plan:
                rule, keys = plan[path]
                problems.append(f"tensor {keys[y] if rule.stacked else keys[0]} (as {value.dtype})")
            else:
                problems.append(
                    f"{'/'.join(path)} of layer {y} (as {value.dtype}, from the adapters or gates)"
                )
    raise_problems(CheckpointError, f"{where}: NaN or Inf weights", problems, max_shown=6)


def save_llama(
    model: LlamaForCausalLM, out_dir: str, *, max_shard_bytes: int | None = None, overwrite: bool = False
) -> None:
    """Writes `config.json` + safetensors (sharded with an index past `max_shard_bytes`).

    The folder is written under a temporary name and renamed into place (`files.staged_directory`),
    so a failure leaves nothing; with `overwrite` an existing folder is replaced only once the new
    one is complete.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already exists (refusing to overwrite it: "
            "pass overwrite=True, or --force on the command line)"
        )
    config = model.config
    tensors: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
        path = tuple(str(p) for p in path)
        rule = next(r for r in HF_KEY_TABLE if r.ours == path)
        value = np.asarray(jax.device_get(var.get_value()))
        for layer, one in enumerate(value) if rule.stacked else [(None, value)]:
            tensors[rule.hf.format(layer=layer)] = one.T if rule.transpose else one

    with staged_directory(out_dir, force=overwrite) as tmp:
        write_text_atomic(os.path.join(tmp, CONFIG_FILE), json.dumps(config.to_hf_dict(), indent=2))
        shards = _split_shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.nbytes for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_text_atomic(os.path.join(tmp, INDEX_FILE), json.dumps(index, indent=2))


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if max_bytes is not None and shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards
