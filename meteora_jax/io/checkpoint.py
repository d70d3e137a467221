"""Our native checkpoint: Orbax steps holding the MeteoRA parameters, never the base weights.

A checkpoint folder is an Orbax `CheckpointManager` directory; each step folder holds

- `params`: the stacked MeteoRA variables of every targeted projection as one nested tree
  `{"layers": {block: {projection: {gate (Y, in, L), lora_a (Y, L, in, R), lora_b (Y, L, R, out),
  scale (Y, L)}}}}` (block is `self_attn` or `mlp`), in the model's parameter dtype;
- `meta`: JSON (`CheckpointMeta`): format version, adapter order and per-module ranks / alphas /
  rsLoRA / source, targets, rank, routing defaults, and the base model it was built on: its
  config, its folder (a hint only) and a fingerprint of its weights (`base_fingerprint`); plus
  `checksums`, a record of every saved array of every item (`io/checksums.py`);
- one more item per `extra_items` entry (a pytree: optimizer state, data-loader state, ...).

Converted models are step 0; training adds later steps to the same folder (keep-N), each step
self-describing. Loading against a base whose config or fingerprint differs is refused.

Integrity: `restore` verifies every restored array against its checksum and the arrays against
the metadata (`check_arrays`: shapes, and each adapter's scales and ranks, so metadata listing
the adapters in another order is refused). A damaged step (unreadable, truncated or missing
files, metadata that is not JSON, a checksum mismatch) raises `CorruptCheckpointError`, so a
training loop can fall back to the previous step: `restore_latest_good` does that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import CheckpointError, ConfigError, MissingFileError, OutputExistsError
from meteora_jax.inputs import is_int, is_real
from meteora_jax.io import checksums
from meteora_jax.io.files import raise_problems, staged_directory
from meteora_jax.io.hf import CONFIG_FILE, IGNORED_KEYS, weight_files
from meteora_jax.io.peft import lora_scaling
from meteora_jax.io.stacking import AdapterInfo, Path, param_path
from meteora_jax.modeling.moe_lora import AdapterScale, GateParam

FORMAT = "meteora-jax"
VERSION = 2  # 2: array checksums in the metadata
PARAMS_ITEM = "params"
META_ITEM = "meta"
META_FILE = "metadata"  # the file Orbax's JsonCheckpointHandler writes in the meta item folder
CHECKSUMS = "checksums"
LEAVES = ("gate", "lora_a", "lora_b", "scale")
# Fingerprint sampling: this many windows of this many bytes, evenly spread over each tensor.
SAMPLES, SAMPLE_BYTES = 16, 256


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step is damaged: unreadable, truncated or missing files, metadata that is not
    JSON, arrays that fail their checksums or disagree with the metadata. The previous step may
    still be good (`restore_latest_good`)."""


# ----------------------------------------------------------------------------- base fingerprint


def base_fingerprint(base_dir: str | os.PathLike) -> str:
    """A fingerprint of a HF LLaMA folder's model, cheap even for a 16 GB checkpoint.

    sha256 over: the parsed model fields of `config.json` (`LlamaConfig.to_hf_dict()`, so
    cosmetic fields such as `transformers_version` do not count); then, for every tensor in
    name order, its name, shape, dtype and `SAMPLES` windows of `SAMPLE_BYTES` bytes spread
    evenly over its data (first and last bytes included; small tensors are hashed whole), read
    through the memory-mapped files, so only ~4 KB per tensor is touched. It does not depend on
    how the weights are sharded over files. It tells apart different models, dtypes and
    fine-tunes (which change every byte); an edit of a few scattered elements may escape it.
    """
    return _fingerprint(os.fspath(base_dir))[0]


def _fingerprint(base_dir: str) -> tuple[str, dict]:
    """(fingerprint, a human summary: tensor count, dtypes, total bytes)."""
    config = LlamaConfig.from_hf(base_dir)
    files = weight_files(base_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
    names = sorted(n for n in files if not IGNORED_KEYS.fullmatch(n))
    dtypes, total = set(), 0
    for name in names:
        file = files[name]
        dtype, shape = file.dtype(name), file.shape(name)
        dtypes.add(str(dtype))
        digest.update(json.dumps([name, list(shape), str(dtype)]).encode())
        raw = np.ascontiguousarray(file.get(name)).reshape(-1).view(np.uint8)
        total += raw.size
        if raw.size <= SAMPLES * SAMPLE_BYTES:
            digest.update(raw.tobytes())
        else:
            for start in np.linspace(0, raw.size - SAMPLE_BYTES, SAMPLES).astype(np.int64):
                digest.update(raw[start : start + SAMPLE_BYTES].tobytes())
    summary = {"tensors": len(names), "dtypes": sorted(dtypes), "bytes": int(total)}
    return f"sha256:{digest.hexdigest()}", summary


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint must say about itself besides the arrays (its `meta` item)."""

    adapters: tuple[AdapterInfo, ...]
    targets: tuple[str, ...]
    rank: int
    top_k: int
    temperature: float
    dropout: float
    base_config: LlamaConfig
    base_path: str | None
    base_fingerprint: str
    base_summary: dict = dataclasses.field(default_factory=dict)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def moe(self, top_k: int | None = None, temperature: float | None = None) -> MoELoRAConfig:
        """The mixture config; top_k / temperature None means the stored defaults."""
        return MoELoRAConfig(
            adapter_names=self.adapter_names,
            targets=self.targets,
            rank=self.rank,
            top_k=self.top_k if top_k is None else top_k,
            temperature=self.temperature if temperature is None else temperature,
            dropout=self.dropout,
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "adapter_names": list(self.adapter_names),
            "adapters": [a.to_json() for a in self.adapters],
            "targets": list(self.targets),
            "rank": self.rank,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "dropout": self.dropout,
            "base": {
                "config": self.base_config.to_hf_dict(),
                "path": self.base_path,
                "fingerprint": self.base_fingerprint,
                **self.base_summary,
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> CheckpointMeta:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(
                f"{where}: not a {FORMAT} checkpoint (its metadata has no format {FORMAT!r})"
            )
        if data.get("version") != VERSION:
            old = (
                " (written before array checksums existed: convert it again)"
                if data.get("version") == 1
                else ""
            )
            raise CheckpointError(
                f"{where}: checkpoint format version {data.get('version')!r} is not supported "
                f"(this meteora-jax reads version {VERSION}){old}"
            )
        try:
            meta = cls._from_fields(data)
            meta.moe()  # names, targets, rank and routing defaults must make a valid mixture
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CorruptCheckpointError(
                f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
            ) from None
        return meta

    @classmethod
    def _from_fields(cls, data: dict) -> CheckpointMeta:
        """The metadata from its JSON fields; KeyError / TypeError / ValueError naming a bad one."""
        base, adapters = data["base"], data["adapters"]
        if not isinstance(base, dict) or not isinstance(adapters, list):
            raise TypeError("base must be an object and adapters a list")
        infos = tuple(AdapterInfo.from_json(a) for a in adapters)
        if [a.name for a in infos] != data["adapter_names"]:
            raise ValueError("adapter_names and adapters disagree")
        for key, valid in (
            ("rank", is_int),
            ("top_k", is_int),
            ("temperature", is_real),
            ("dropout", is_real),
        ):
            if not valid(data.get(key, 0.0)):
                raise TypeError(f"{key} is {data.get(key)!r}")
        targets, path, fingerprint = data["targets"], base.get("path"), base["fingerprint"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a list of projection names, got {targets!r}")
        if not isinstance(fingerprint, str) or not (path is None or isinstance(path, str)):
            raise TypeError("base fingerprint and path must be strings")
        return cls(
            adapters=infos,
            targets=tuple(targets),
            rank=data["rank"],
            top_k=data["top_k"],
            temperature=float(data["temperature"]),
            dropout=float(data.get("dropout", 0.0)),
            base_config=LlamaConfig.from_hf(base["config"]),
            base_path=path,
            base_fingerprint=fingerprint,
            base_summary={k: base[k] for k in ("tensors", "dtypes", "bytes") if k in base},
        )


def make_meta(moe: MoELoRAConfig, infos, base_dir: str) -> CheckpointMeta:
    """The metadata of a model over `base_dir` (computes the base fingerprint)."""
    infos = tuple(infos)
    if tuple(i.name for i in infos) != moe.adapter_names:
        raise ConfigError(
            f"adapter infos {[i.name for i in infos]} do not match the model's adapters "
            f"{list(moe.adapter_names)}"
        )
    fingerprint, summary = _fingerprint(base_dir)
    return CheckpointMeta(
        adapters=infos,
        targets=moe.targets,
        rank=moe.rank,
        top_k=moe.top_k,
        temperature=float(moe.temperature),
        dropout=float(moe.dropout),
        base_config=LlamaConfig.from_hf(base_dir),
        base_path=os.path.abspath(base_dir),
        base_fingerprint=fingerprint,
        base_summary=summary,
    )


def check_base(
    meta: CheckpointMeta, base_dir: str | os.PathLike, where: str, config: LlamaConfig | None = None
) -> None:
    """Refuses a base folder whose config or weights differ from the checkpoint's base.

    config: the base folder's, when the caller has already read it.
    """
    base_dir = os.fspath(base_dir)
    config = LlamaConfig.from_hf(base_dir) if config is None else config
    built_on = f"checkpoint {where} was built on the base {meta.base_path}"
    if config != meta.base_config:
        diffs = [
            f"{f.name} {getattr(meta.base_config, f.name)!r} vs {getattr(config, f.name)!r}"
            for f in dataclasses.fields(LlamaConfig)
            if getattr(meta.base_config, f.name) != getattr(config, f.name)
        ]
        raise CheckpointError(
            f"{built_on}, whose {CONFIG_FILE} differs from {base_dir}'s: {'; '.join(diffs)} "
            "(checkpoint vs given base)"
        )
    fingerprint, summary = _fingerprint(base_dir)
    if fingerprint != meta.base_fingerprint:
        raise CheckpointError(
            f"{built_on} (fingerprint {meta.base_fingerprint}, {_describe(meta.base_summary)}), but the "
            f"weights in {base_dir} differ (fingerprint {fingerprint}, {_describe(summary)}): "
            "load it with the base it was made for"
        )


def _describe(summary: dict) -> str:
    if not summary:
        return "no summary"
    dtypes = "/".join(summary.get("dtypes", []))
    return f"{summary.get('tensors')} tensors, {dtypes}, {summary.get('bytes')} bytes"


# ----------------------------------------------------------------------------- params


def model_params(module: nnx.Module) -> dict[Path, jax.Array]:
    """The MeteoRA variables of a `LlamaForCausalLM` (gates, stacked adapters, scales) by path."""
    state = nnx.state(module, nnx.Any(GateParam, nnx.LoRAParam, AdapterScale))
    return {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def expected_shapes(meta_or_moe, config: LlamaConfig) -> dict[Path, tuple[int, ...]]:
    """The shape of every MeteoRA variable of a model with this mixture over this base."""
    y, n, r = config.num_hidden_layers, len(meta_or_moe.adapter_names), meta_or_moe.rank
    out = {}
    for proj in meta_or_moe.targets:
        d_in, d_out = projection_shape(config, proj)
        shapes = {
            "gate": (y, d_in, n),
            "lora_a": (y, n, d_in, r),
            "lora_b": (y, n, r, d_out),
            "scale": (y, n),
        }
        out.update({param_path(proj, leaf): shape for leaf, shape in shapes.items()})
    return out


def check_arrays(
    params: Mapping[Path, Any],
    meta: CheckpointMeta,
    where: str,
    error: type[CheckpointError] = CheckpointError,
) -> None:
    """Refuses MeteoRA parameters that the metadata does not describe: missing, unexpected or
    mis-shaped arrays, and per adapter scales or ranks other than its metadata's.

    The one check between a checkpoint's arrays and its metadata, run at save and at every
    restore (so by `load_model`, `export` and training alike). Per adapter i it compares the
    scale column `scale[:, i]` with alpha / r (or alpha / sqrt(r)) of each module in
    `meta.adapters[i]` (0 where it adapts nothing), and checks the rank padding is zero, so
    metadata listing the adapters in another order is caught whenever their ranks or alphas differ.
    """
    expected = expected_shapes(meta, meta.base_config)
    problems = [f"missing {'/'.join(p)} {s}" for p, s in expected.items() if p not in params]
    problems += [f"unexpected {'/'.join(p)}" for p in params if p not in expected]
    problems += [
        f"{'/'.join(p)} has shape {tuple(np.shape(v))}, expected {expected[p]}"
        for p, v in params.items()
        if p in expected and tuple(np.shape(v)) != expected[p]
    ]
    raise_problems(error, where, problems)
    columns = {proj: _used_rank_columns(params, proj) for proj in meta.targets}
    scales = {proj: checksums.host_array(params[param_path(proj, "scale")]) for proj in meta.targets}
    for i, info in enumerate(meta.adapters):
        problems += _adapter_problems(meta, i, info, scales, columns)
    raise_problems(error, f"{where}: the arrays do not fit the metadata's adapters", problems, max_shown=4)


def _used_rank_columns(params: Mapping[Path, Any], proj: str) -> np.ndarray:
    """(Y, L, R) bool: which rank columns of each adapter contribute (non-zero in both A and B).

    A column that is zero in A or in B adds nothing, so padding may hold anything in the other.
    """
    a, b = params[param_path(proj, "lora_a")], params[param_path(proj, "lora_b")]
    xp = jnp if isinstance(a, jax.Array) else np  # reduce where the stacks live, copy only (Y, L, R)
    used = xp.any(a != 0, axis=2) & xp.any(b != 0, axis=3)
    return checksums.host_array(used)


def _adapter_problems(meta: CheckpointMeta, i: int, info: AdapterInfo, scales, columns) -> list[str]:
    """The first way adapter `i`'s arrays differ from its metadata (module slots, scales, padding).

    scales: projection -> (Y, L) scale stack; columns: projection -> `_used_rank_columns`.
    """
    y_count = meta.base_config.num_hidden_layers
    outside = [k for k in info.ranks if k[1] not in meta.targets or not 0 <= k[0] < y_count]
    if outside:
        return [f"adapter {info.name!r} lists module {outside[0]} outside the checkpoint's layers / targets"]
    for proj in meta.targets:
        for y in range(y_count):
            rank, got = info.ranks.get((y, proj)), float(scales[proj][y, i])
            where = f"adapter {info.name!r} (#{i}) at layer {y} {proj}"
            if rank is not None and not 1 <= rank <= meta.rank:
                return [f"{where} has rank {rank} in its metadata, beyond the checkpoint's rank {meta.rank}"]
            want = 0.0 if rank is None else lora_scaling(info.alphas[(y, proj)], rank, info.use_rslora)
            if not math.isclose(got, want, rel_tol=1e-5, abs_tol=0.0):
                what = "no module" if rank is None else f"alpha {info.alphas[(y, proj)]:g}, rank {rank}"
                return [
                    f"{where} has scale {got:g}, but its metadata ({what}) gives {want:g} "
                    "(adapters listed in another order?)"
                ]
            if columns[proj][y, i, rank or 0 :].any():
                what = "no module" if rank is None else f"rank {rank}"
                return [f"{where} uses rank columns beyond its metadata's {what}"]
    return []


def _nest(params: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in params.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


# ----------------------------------------------------------------------------- folders


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The finished steps of a checkpoint folder (empty if it is not one)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, META_ITEM))
    )


def _manager(
    directory: str, max_to_keep: int | None = None, extra: tuple[str, ...] = ()
) -> ocp.CheckpointManager:
    handlers = {PARAMS_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
    handlers.update({name: ocp.StandardCheckpointHandler() for name in extra})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save_args(params: Mapping[Path, Any], meta: CheckpointMeta, extra_items: Mapping[str, Any] | None = None):
    """Orbax `Composite` args of one step: a training loop can hand them to its own (async) manager.

    Computes the checksum of every array of every item now (one pass over the bytes on the
    host; a sharded array is gathered), so later changes to the arrays do not affect the step.
    """
    extra_items = dict(extra_items or {})
    reserved = {PARAMS_ITEM, META_ITEM} & extra_items.keys()
    bad = [n for n in extra_items if not n.isidentifier()]
    if reserved or bad:
        raise ConfigError(
            f"extra item names must be identifiers other than params / meta, got {sorted(extra_items)}"
        )
    trees = {PARAMS_ITEM: _nest(params), **extra_items}
    records = {}
    for name, tree in trees.items():
        records.update(checksums.tree_records(name, tree))
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items[META_ITEM] = ocp.args.JsonSave({**meta.to_json(), CHECKSUMS: records})
    return ocp.args.Composite(**items)


# ----------------------------------------------------------------------------- save / restore


def save_checkpoint(
    directory: str | os.PathLike,
    model,
    base_dir: str | os.PathLike,
    *,
    step: int = 0,
    extra_items: Mapping[str, Any] | None = None,
    force: bool = False,
    max_to_keep: int | None = None,
) -> str:
    """Saves a fused `MeteoRAModel` (gates, stacked adapters, scales, metadata) as `step`.

    See `write_checkpoint`; returns the checkpoint folder.
    """
    if model.moe is None:
        raise ConfigError("this model has no adapters: there is nothing to checkpoint (use save_llama)")
    return write_checkpoint(
        directory,
        model_params(model.module),
        model.moe,
        model.adapter_info,
        base_dir,
        step=step,
        extra_items=extra_items,
        force=force,
        max_to_keep=max_to_keep,
    )


def write_checkpoint(
    directory: str | os.PathLike,
    params: Mapping[Path, Any],
    moe: MoELoRAConfig,
    infos,
    base_dir: str | os.PathLike,
    *,
    step: int = 0,
    extra_items: Mapping[str, Any] | None = None,
    force: bool = False,
    max_to_keep: int | None = None,
) -> str:
    """Writes MeteoRA parameters (numpy or jax arrays, by parameter path) as checkpoint `step`.

    A new folder is built next to `directory` and renamed into place. A folder that already
    holds a checkpoint of the same adapters over the same base gains the new step (Orbax
    writes each step atomically; `max_to_keep` prunes old ones). An existing step, or any
    other existing content, is refused unless `force`, which replaces the whole folder.
    extra_items: more pytrees saved beside the parameters (optimizer state for training).
    """
    directory = os.path.abspath(os.fspath(directory))
    base_dir = os.fspath(base_dir)
    meta = make_meta(moe, infos, base_dir)
    check_arrays(params, meta, where=f"parameters for {directory}")
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative integer, got {step!r}")
    args = save_args(params, meta, extra_items)
    extra = tuple(extra_items or ())
    steps = checkpoint_steps(directory)
    latest = _latest_meta(directory, force) if steps else None
    if latest is not None and step not in steps and _same_model(meta, latest):
        with _manager(directory, max_to_keep, extra) as manager:  # one more step: training goes on
            manager.save(step, args=args)
        return directory
    if latest is not None and not force:
        if step in steps:
            raise OutputExistsError(
                f"{directory} already holds step {step} (refusing to overwrite it: pass --force / "
                "force=True, which replaces the whole checkpoint folder)"
            )
        raise CheckpointError(
            f"{directory} holds a checkpoint of other adapters or another base ({list(latest.adapter_names)} "
            f"over {latest.base_path}): choose another folder, or pass force to replace it"
        )
    with staged_directory(directory, force=force) as tmp, _manager(tmp, max_to_keep, extra) as manager:
        manager.save(step, args=args)
    return directory


def _latest_meta(directory: str, force: bool) -> CheckpointMeta | None:
    """The latest step's metadata; None when it is unreadable but `force` will replace the folder."""
    try:
        return read_meta(directory)[1]
    except CheckpointError:
        if force:
            return None
        raise


def _same_model(a: CheckpointMeta, b: CheckpointMeta) -> bool:
    """Whether two steps describe one model (so they may share a folder): adapters, shapes, base."""
    keys = ("adapters", "targets", "rank")
    ja, jb = a.to_json(), b.to_json()
    return all(ja[k] == jb[k] for k in keys) and a.base_fingerprint == b.base_fingerprint


def read_meta(directory: str | os.PathLike, step: int | None = None) -> tuple[int, CheckpointMeta]:
    """(step, metadata) of a checkpoint step (default: the latest), reading only the JSON."""
    directory, step = _resolve(directory, step)
    return step, CheckpointMeta.from_json(_meta_json(directory, step), where=f"{directory} (step {step})")


def _meta_json(directory: str, step: int) -> Any:
    """The raw JSON of a step's `meta` item; CorruptCheckpointError naming its file when unreadable."""
    try:
        with _manager(directory) as manager:
            return manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[
                META_ITEM
            ]
    except Exception as e:  # Orbax / JSON errors of a damaged file: translated into one line
        raise _read_error(e, os.path.join(directory, str(step), META_ITEM, META_FILE), step) from None


def _resolve(directory: str | os.PathLike, step: int | None) -> tuple[str, int]:
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise MissingFileError(f"checkpoint folder {directory} does not exist")
    steps = checkpoint_steps(directory)
    if not steps:
        hint = ""
        if os.path.isfile(os.path.join(directory, "model.safetensors")):
            hint = f" (for a MeteoRA reference checkpoint, pass the file {directory}/model.safetensors)"
        raise CheckpointError(
            f"{directory} is not a {FORMAT} checkpoint folder: it has no step folders{hint}"
        )
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory} has no step {step} (it has {steps})")
    return directory, step


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One restored step: metadata, MeteoRA parameters (numpy, by path) and extra items."""

    step: int
    meta: CheckpointMeta
    params: dict[Path, np.ndarray]
    extra: dict[str, Any]


def restore(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    extra_items: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Restores a checkpoint step (default: the latest) as numpy arrays on the host, verified.

    extra_items: {name: target pytree, or None to restore it as saved (numpy)} for items
    beyond the parameters, such as optimizer state. Every restored array is checked against
    its checksum, and the parameters against the metadata (`check_arrays`). Raises
    FileNotFoundError for a missing folder, CorruptCheckpointError for a damaged step (the
    previous one may be good: see `restore_latest_good`) and CheckpointError for anything else
    that is not a well-formed checkpoint of ours (another format version, a missing item).
    """
    directory, step = _resolve(directory, step)
    raw = _meta_json(directory, step)
    where = f"{directory} (step {step})"
    meta = CheckpointMeta.from_json(raw, where)
    records = raw.get(CHECKSUMS)
    if not isinstance(records, dict):
        raise CorruptCheckpointError(f"{where}: its metadata has no {CHECKSUMS} object")
    extra_items = dict(extra_items or {})
    missing = [
        n for n in (PARAMS_ITEM, *extra_items) if not os.path.isdir(os.path.join(directory, str(step), n))
    ]
    if missing:
        raise CheckpointError(f"{where}: has no item {', '.join(missing)}")
    restored = _restore_items(directory, step, extra_items)
    problems = [p for name, tree in restored.items() for p in checksums.mismatches(name, tree, records)]
    raise_problems(CorruptCheckpointError, where, problems, max_shown=4)
    params = {path: np.asarray(value) for path, value in _flatten(restored[PARAMS_ITEM]).items()}
    check_arrays(params, meta, where, CorruptCheckpointError)
    return Checkpoint(step, meta, params, {name: restored[name] for name in extra_items})


def restore_latest_good(
    directory: str | os.PathLike, *, extra_items: Mapping[str, Any] | None = None
) -> Checkpoint:
    """Restores the newest step that is intact, skipping damaged ones with a warning.

    For resuming training after a crash or a disk fault: a step for which `restore` raises
    CorruptCheckpointError is skipped and the step before it tried. Raises
    CorruptCheckpointError when every step is damaged, and what `restore` raises otherwise
    (a missing folder, another format version: those are not skipped).
    """
    directory, _ = _resolve(directory, None)
    skipped = []
    for step in reversed(checkpoint_steps(directory)):
        try:
            return restore(directory, step, extra_items=extra_items)
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint step {step}: {e}", UserWarning, stacklevel=2)
            skipped.append(str(e))
    raise CorruptCheckpointError(f"{directory}: every step is damaged; the newest: {skipped[0]}")


def _restore_items(directory: str, step: int, extra_items: Mapping[str, Any]) -> dict[str, Any]:
    """The params item and the extra items of one step, as stored; read errors translated."""
    try:
        with _manager(directory, extra=tuple(extra_items)) as manager:
            stored = manager.item_metadata(step)
            targets = {PARAMS_ITEM: _host_target(stored[PARAMS_ITEM])}
            for name, target in extra_items.items():
                targets[name] = _host_target(stored[name]) if target is None else target
            restored = manager.restore(
                step, args=ocp.args.Composite(**{n: ocp.args.StandardRestore(t) for n, t in targets.items()})
            )
    except Exception as e:  # Orbax / tensorstore errors of damaged files: translated into one line
        raise _read_error(e, os.path.join(directory, str(step)), step) from None
    return {name: restored[name] for name in targets}


# A tensorstore read error names the array as Orbax stored it ("layers.mlp.up_proj.gate/0.0.0")
# and the item folder it read ('at local file "/ckpt/0/params/"').
_ARRAY_IN_ERROR = re.compile(r'Error reading "([^"/]+)(?:/[^"]*)?"')
_FOLDER_IN_ERROR = re.compile(r'at local file "([^"]*)"')
_MAX_DETAIL = 200  # characters of the underlying error kept in ours
_OCDBT_PREFIX = re.compile(r'Error reading "[^"]*" in OCDBT database at local file "[^"]*":\s*')


def _read_error(error: Exception, path: str, step: int) -> CheckpointError:
    """One line for an Orbax / tensorstore / JSON failure to read `path` (a file or step folder).

    Read failures (tensorstore status codes, OSError, bad JSON) mean a damaged step:
    CorruptCheckpointError. Anything else (a restore target that does not fit) stays a plain
    CheckpointError, so `restore_latest_good` does not skip a good step for a caller's mistake.
    """
    _quiet_orbax_teardown()
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    folder, array = _FOLDER_IN_ERROR.search(text), _ARRAY_IN_ERROR.search(text)
    if folder:
        path = os.path.normpath(folder.group(1))
    named = f": array {os.path.basename(path)}/{array.group(1).replace('.', '/')}" if folder and array else ""
    detail = _OCDBT_PREFIX.sub("", text.split(" [tensorstore_spec=")[0]).replace(
        'Error opening "zarr" driver: ', ""
    )
    detail = detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."
    damaged = isinstance(error, OSError | json.JSONDecodeError | UnicodeDecodeError) or re.match(
        r"[A-Z_]{4,}: ", text
    )
    if not damaged:
        return CheckpointError(
            f"{path} (step {step}){named}: cannot be restored ({type(error).__name__}: {detail})"
        )
    return CorruptCheckpointError(
        f"{path} (step {step}){named}: cannot be read, the checkpoint is damaged ({detail})"
    )


def _drop_closed_loop_reports(previous, report) -> None:
    if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
        return
    previous(report)


def _quiet_orbax_teardown() -> None:
    """Silences the tracebacks tensorstore prints after a failed Orbax restore.

    Orbax closes its event loop as soon as one read fails; the completion callbacks of the
    reads still in flight then hit the closed loop, and Python prints each as an "unraisable"
    traceback after our one-line error. Installed once, on the first failed read; every other
    report still reaches the previous hook.
    """
    hook = sys.unraisablehook
    if getattr(hook, "func", None) is not _drop_closed_loop_reports:
        sys.unraisablehook = functools.partial(_drop_closed_loop_reports, hook)


def _host_target(tree_metadata):
    """A numpy restore target mirroring stored array metadata (so nothing lands on a device)."""
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
