"""Our native checkpoint: Orbax steps holding the MeteoRA parameters, never the base weights.

A checkpoint folder is an Orbax `CheckpointManager` directory; each step folder holds

- `params`: the stacked MeteoRA variables of every targeted projection as one nested tree
  `{"layers": {block: {projection: {gate (Y, in, L), lora_a (Y, L, in, R), lora_b (Y, L, R, out),
  scale (Y, L)}}}}` (block is `self_attn` or `mlp`), in the model's parameter dtype;
- `meta`: JSON (`CheckpointMeta`): format version, adapter order and per-module ranks / alphas /
  rsLoRA / source, targets, rank, routing defaults, and the base model it was built on: its
  config, its folder (a hint only) and a fingerprint of its weights (`base_fingerprint`);
- one more item per `extra_items` entry (a pytree: optimizer state, data-loader state, ...).

Converted models are step 0; training adds later steps to the same folder (keep-N), each step
self-describing. Loading against a base whose config or fingerprint differs is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.io.files import raise_problems, staged_directory
from meteora_jax.io.hf import CONFIG_FILE, IGNORED_KEYS, weight_files
from meteora_jax.io.stacking import AdapterInfo, Path, param_path
from meteora_jax.modeling.moe_lora import AdapterScale, GateParam

FORMAT = "meteora-jax"
VERSION = 1
PARAMS_ITEM = "params"
META_ITEM = "meta"
LEAVES = ("gate", "lora_a", "lora_b", "scale")
# Fingerprint sampling: this many windows of this many bytes, evenly spread over each tensor.
SAMPLES, SAMPLE_BYTES = 16, 256


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
            raise CheckpointError(
                f"{where}: checkpoint format version {data.get('version')!r} is not supported "
                f"(this meteora-jax reads version {VERSION})"
            )
        try:
            base = data["base"]
            adapters = tuple(AdapterInfo.from_json(a) for a in data["adapters"])
            if [a.name for a in adapters] != list(data["adapter_names"]):
                raise CheckpointError(f"{where}: adapter_names and adapters disagree")
            return cls(
                adapters=adapters,
                targets=tuple(data["targets"]),
                rank=int(data["rank"]),
                top_k=int(data["top_k"]),
                temperature=float(data["temperature"]),
                dropout=float(data.get("dropout", 0.0)),
                base_config=LlamaConfig.from_hf(base["config"]),
                base_path=base.get("path"),
                base_fingerprint=str(base["fingerprint"]),
                base_summary={k: base[k] for k in ("tensors", "dtypes", "bytes") if k in base},
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
            ) from None


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


def _check_params(params: Mapping[Path, Any], meta: CheckpointMeta, where: str) -> None:
    expected = expected_shapes(meta, meta.base_config)
    problems = [f"missing {'/'.join(p)} {s}" for p, s in expected.items() if p not in params]
    problems += [f"unexpected {'/'.join(p)}" for p in params if p not in expected]
    problems += [
        f"{'/'.join(p)} has shape {tuple(np.shape(v))}, expected {expected[p]}"
        for p, v in params.items()
        if p in expected and tuple(np.shape(v)) != expected[p]
    ]
    raise_problems(CheckpointError, where, problems)


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
    """Orbax `Composite` args of one step: a training loop can hand them to its own (async) manager."""
    extra_items = dict(extra_items or {})
    reserved = {PARAMS_ITEM, META_ITEM} & extra_items.keys()
    bad = [n for n in extra_items if not n.isidentifier()]
    if reserved or bad:
        raise ConfigError(
            f"extra item names must be identifiers other than params / meta, got {sorted(extra_items)}"
        )
    items = {
        PARAMS_ITEM: ocp.args.StandardSave(_nest(params)),
        META_ITEM: ocp.args.JsonSave(meta.to_json()),
    }
    items.update({name: ocp.args.StandardSave(tree) for name, tree in extra_items.items()})
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
    _check_params(params, meta, where=f"parameters for {directory}")
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative integer, got {step!r}")
    args = save_args(params, meta, extra_items)
    extra = tuple(extra_items or ())
    steps = checkpoint_steps(directory)
    latest = read_meta(directory)[1] if steps else None
    if latest is not None and step not in steps and _same_model(meta, latest):
        with _manager(directory, max_to_keep, extra) as manager:  # one more step: training goes on
            manager.save(step, args=args)
        return directory
    if latest is not None and not force:
        if step in steps:
            raise FileExistsError(
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


def _same_model(a: CheckpointMeta, b: CheckpointMeta) -> bool:
    """Whether two steps describe one model (so they may share a folder): adapters, shapes, base."""
    keys = ("adapters", "targets", "rank")
    ja, jb = a.to_json(), b.to_json()
    return all(ja[k] == jb[k] for k in keys) and a.base_fingerprint == b.base_fingerprint


def read_meta(directory: str | os.PathLike, step: int | None = None) -> tuple[int, CheckpointMeta]:
    """(step, metadata) of a checkpoint step (default: the latest), reading only the JSON."""
    directory, step = _resolve(directory, step)
    with _manager(directory) as manager:
        data = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[
            META_ITEM
        ]
    return step, CheckpointMeta.from_json(data, where=f"{directory} (step {step})")


def _resolve(directory: str | os.PathLike, step: int | None) -> tuple[str, int]:
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
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
    """Restores a checkpoint step (default: the latest) as numpy arrays on the host.

    extra_items: {name: target pytree, or None to restore it as saved (numpy)} for items
    beyond the parameters, such as optimizer state. Raises FileNotFoundError for a missing
    folder and CheckpointError for anything that is not a well-formed checkpoint of ours.
    """
    directory, step = _resolve(directory, step)
    step, meta = read_meta(directory, step)
    where = f"{directory} (step {step})"
    extra_items = dict(extra_items or {})
    missing = [
        n for n in (PARAMS_ITEM, *extra_items) if not os.path.isdir(os.path.join(directory, str(step), n))
    ]
    if missing:
        raise CheckpointError(f"{where}: has no item {', '.join(missing)}")
    with _manager(directory, extra=tuple(extra_items)) as manager:
        stored = manager.item_metadata(step)
        targets = {PARAMS_ITEM: _host_target(stored[PARAMS_ITEM])}
        for name, target in extra_items.items():
            targets[name] = _host_target(stored[name]) if target is None else target
        restored = manager.restore(
            step, args=ocp.args.Composite(**{n: ocp.args.StandardRestore(t) for n, t in targets.items()})
        )
    params = {path: np.asarray(value) for path, value in _flatten(restored[PARAMS_ITEM]).items()}
    _check_params(params, meta, where)
    return Checkpoint(step, meta, params, {name: restored[name] for name in extra_items})


def _host_target(tree_metadata):
    """A numpy restore target mirroring stored array metadata (so nothing lands on a device)."""
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
