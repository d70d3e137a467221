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

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from meteora_jax.config import LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import (
    CheckpointError,
    ConfigError,
    MeteoRAError,
    MissingFileError,
    OutputExistsError,
    storage_error,
)
from meteora_jax.inputs import check_text
from meteora_jax.io import checksums

# The metadata half of a checkpoint lives in checkpoint_meta; its names are part of this API.
from meteora_jax.io.checkpoint_meta import FORMAT as FORMAT
from meteora_jax.io.checkpoint_meta import VERSION as VERSION
from meteora_jax.io.checkpoint_meta import CheckpointMeta as CheckpointMeta
from meteora_jax.io.checkpoint_meta import CorruptCheckpointError as CorruptCheckpointError
from meteora_jax.io.checkpoint_meta import base_fingerprint as base_fingerprint
from meteora_jax.io.checkpoint_meta import check_base as check_base
from meteora_jax.io.checkpoint_meta import make_meta as make_meta
from meteora_jax.io.files import raise_problems, staged_directory
from meteora_jax.io.peft import lora_scaling
from meteora_jax.io.safetensors_io import SafetensorsFile, save_file
from meteora_jax.io.stacking import AdapterInfo, ParamPath, param_path
from meteora_jax.modeling.meteora_linear import AdapterScale, GateParam

PARAMS_ITEM = "params"
META_ITEM = "meta"
META_FILE = "metadata"  # the file Orbax's JsonCheckpointHandler writes in the meta item folder
CHECKSUMS = "checksums"
SHARED, SHARED_FILE = "shared_params", "shared_params.safetensors"  # arrays kept once per folder
LEAVES = ("gate", "lora_a", "lora_b", "scale")


# ----------------------------------------------------------------------------- params


def model_params(module: nnx.Module) -> dict[ParamPath, jax.Array]:
    """The MeteoRA variables of a `LlamaForCausalLM` (gates, stacked adapters, scales) by path."""
    state = nnx.state(module, nnx.Any(GateParam, nnx.LoRAParam, AdapterScale))
    return {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def expected_shapes(meta_or_moe, config: LlamaConfig) -> dict[ParamPath, tuple[int, ...]]:
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
    params: Mapping[ParamPath, Any],
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


def _used_rank_columns(params: Mapping[ParamPath, Any], proj: str) -> np.ndarray:
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


def _nest(params: Mapping[ParamPath, Any]) -> dict:
    tree: dict = {}
    for path, value in params.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Mapping, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
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


def check_path_text(directory: str | os.PathLike, setting: str) -> None:
    """Refuses a checkpoint folder whose path is not UTF-8 text: Orbax (tensorstore) reads and
    writes only such paths, and fails deep inside its threads on any other."""
    text = os.fspath(directory)
    try:
        check_text(text, f"{setting} {text!r}", from_os=True)
    except ConfigError as e:
        raise ConfigError(f"{e}: checkpoints are read and written only under UTF-8 paths") from None


def _manager(
    directory: str, max_to_keep: int | None = None, extra: tuple[str, ...] = ()
) -> ocp.CheckpointManager:
    handlers = {PARAMS_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
    handlers.update({name: ocp.StandardCheckpointHandler() for name in extra})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save_args(
    params: Mapping[ParamPath, Any],
    meta: CheckpointMeta,
    extra_items: Mapping[str, Any] | None = None,
    *,
    shared: Mapping[str, dict] | None = None,
):
    """Orbax `Composite` args of one step: a training loop can hand them to its own (async) manager.

    Computes the checksum of every array of every item now (one pass over the bytes on the
    host; a sharded array is gathered), so later changes to the arrays do not affect the step.
    shared: `write_shared`'s records, when `params` leaves out arrays kept once for the whole
    folder (a training run's frozen adapter stacks); the step records their checksums too.
    """
    extra_items = dict(extra_items or {})
    reserved = {PARAMS_ITEM, META_ITEM} & extra_items.keys()
    bad = [n for n in extra_items if not n.isidentifier()]
    if reserved or bad:
        raise ConfigError(
            f"extra item names must be identifiers other than params / meta, got {sorted(extra_items)}"
        )
    trees = {PARAMS_ITEM: _nest(params), **extra_items}
    records = dict(shared or {})
    for name, tree in trees.items():
        records.update(checksums.tree_records(name, tree))
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    meta_json = {**meta.to_json(), CHECKSUMS: records}
    if shared:
        meta_json[SHARED] = SHARED_FILE
    items[META_ITEM] = ocp.args.JsonSave(meta_json)
    return ocp.args.Composite(**items)


def write_shared(directory: str | os.PathLike, params: Mapping[ParamPath, Any]) -> dict[str, dict]:
    """Writes parameters every step of a folder shares (frozen adapter stacks: written once, not
    at every save) as `SHARED_FILE`, atomically; returns their checksum records for `save_args`.
    In a multi-host run every process calls it; process 0 writes."""
    arrays = {path: checksums.host_array(value) for path, value in params.items()}
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        save_file({"/".join(path): a for path, a in arrays.items()}, os.path.join(directory, SHARED_FILE))
    return shared_records_of(arrays)


def shared_records_of(params: Mapping[ParamPath, Any]) -> dict[str, dict]:
    """The checksum records `write_shared` would return for these parameters (writes nothing)."""
    return checksums.tree_records(PARAMS_ITEM, _nest({p: checksums.host_array(v) for p, v in params.items()}))


def shared_records(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The checksum records of a folder's `SHARED_FILE` as it is on disk (None without one)."""
    path = os.path.join(os.fspath(directory), SHARED_FILE)
    if not os.path.isfile(path):
        return None
    stored = SafetensorsFile(path)
    return shared_records_of({tuple(name.split("/")): stored.get(name) for name in stored.names()})


def _with_shared(directory: str, raw: Mapping, tree: dict, where: str) -> dict:
    """The params tree of a step completed with the folder's shared arrays (when it uses them)."""
    if raw.get(SHARED) is None:
        return tree
    path = os.path.join(directory, SHARED_FILE)
    if raw[SHARED] != SHARED_FILE or not os.path.isfile(path):
        raise CorruptCheckpointError(f"{where}: its shared parameters {path} are missing")
    try:
        stored = SafetensorsFile(path)
        shared = {tuple(name.split("/")): np.asarray(stored.get(name)) for name in stored.names()}
    except MeteoRAError as e:
        raise CorruptCheckpointError(f"{where}: its shared parameters cannot be read: {e}") from None
    merged = {**_flatten(tree), **shared}
    return _nest(merged)


# ----------------------------------------------------------------------------- save / restore


def save_checkpoint(directory: str | os.PathLike, model, base_dir: str | os.PathLike, **options) -> str:
    """Saves a fused `MeteoRAModel` (gates, stacked adapters, scales, metadata) as a checkpoint.

    options: `write_checkpoint`'s keywords (step, extra_items, force, max_to_keep); returns the
    checkpoint folder.
    """
    if model.moe is None:
        raise ConfigError("this model has no adapters: there is nothing to checkpoint (use save_llama)")
    params = model_params(model.module)
    return write_checkpoint(directory, params, model.moe, model.adapter_info, base_dir, **options)


def write_checkpoint(
    directory: str | os.PathLike,
    params: Mapping[ParamPath, Any],
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
    check_path_text(directory, "checkpoint folder")
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
        with _storage_named(directory), _manager(directory, max_to_keep, extra) as manager:
            manager.save(step, args=args)  # one more step: training goes on
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
    with (
        _storage_named(directory),
        staged_directory(directory, force=force) as tmp,
        _manager(tmp, max_to_keep, extra) as manager,
    ):
        manager.save(step, args=args)
    return directory


@contextlib.contextmanager
def _storage_named(directory: str) -> Iterator[None]:
    """A full disk or read-only file system while saving into `directory` is one OSError naming
    `directory` (not Orbax's temporary files under it), its reports from Orbax's threads dropped;
    other failures pass unchanged."""
    try:
        with storage_failures_reported_once():
            yield
    except Exception as e:
        storage = storage_error(e)
        if storage is None:
            raise
        raise OSError(storage.errno, storage.strerror, directory) from None


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
    except MemoryError:
        raise
    except Exception as e:  # Orbax / JSON errors of a damaged file: translated into one line
        raise _read_error(e, os.path.join(directory, str(step), META_ITEM, META_FILE), step) from None


def _resolve(directory: str | os.PathLike, step: int | None) -> tuple[str, int]:
    directory = os.path.abspath(os.fspath(directory))
    check_path_text(directory, "checkpoint folder")
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
    params: dict[ParamPath, np.ndarray]
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
    restored[PARAMS_ITEM] = _with_shared(directory, raw, restored[PARAMS_ITEM], where)
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
    """The params item and the extra items of one step, as stored; read errors translated, and
    a target whose entries are not the stored ones refused as a CheckpointError naming them."""
    misfit = None
    quiet_orbax_teardown()  # before the reads: a failed one's neighbours may report at once
    try:
        with _manager(directory, extra=tuple(extra_items)) as manager:
            stored = {n: _item_metadata(directory, step, n) for n in (PARAMS_ITEM, *extra_items)}
            targets = {PARAMS_ITEM: _host_target(stored[PARAMS_ITEM])}
            for name, target in extra_items.items():
                targets[name] = _host_target(stored[name]) if target is None else target
                misfit = misfit or _entries_misfit(name, stored[name], target)
            if misfit is None:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(**{n: ocp.args.StandardRestore(t) for n, t in targets.items()}),
                )
    except MemoryError:
        raise
    except Exception as e:  # Orbax / tensorstore errors of damaged files: translated into one line
        _QUIET_DAMAGED_READS.folders.add(os.path.abspath(os.path.join(directory, str(step))))
        logging.getLogger("asyncio").addFilter(_QUIET_DAMAGED_READS)  # once: a logger keeps a filter once
        raise _read_error(e, os.path.join(directory, str(step)), step) from None
    if misfit is not None:
        raise CheckpointError(f"{directory} (step {step}): {misfit}")
    return {name: restored[name] for name in targets}


def _item_metadata(directory: str, step: int, name: str):
    """The stored array metadata of one item, read by its own handler: the manager's
    `item_metadata` reads every item of the step and warns about those it has no handler for
    (a training step's data position), though reading only some of them is normal here."""
    return ocp.StandardCheckpointHandler().metadata(epath.Path(directory, str(step), name))


def _entries(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{entry path: (shape, dtype name)} of a stored item's metadata or a restore target."""
    leaves = jax.tree_util.tree_leaves_with_path(getattr(tree, "tree", tree))
    entries = {}
    for path, leaf in leaves:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        entries[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return entries


def _entries_misfit(name: str, stored, target) -> str | None:
    """What differs between the entries of item `name` as stored and the restore `target` (None:
    the same, or no target). A step saved under other settings (another optimizer chain) is not
    damaged: it is refused by name, never read into the wrong places. Checked before reading, so
    that whatever fails during the read itself is the files' fault."""
    if target is None:
        return None
    have, want = _entries(stored), _entries(target)
    if have.keys() != want.keys():
        saved_only = ", ".join(sorted(have.keys() - want.keys())[:3]) or "none"
        asked_only = ", ".join(sorted(want.keys() - have.keys())[:3]) or "none"
        return (
            f"its item {name!r} holds other entries than this run's (saved only: {saved_only}; this "
            f"run's only: {asked_only}): it was saved with other settings or another meteora-jax version"
        )
    other = [
        f"{k}: {have[k][1]}{list(have[k][0])} stored, {want[k][1]}{list(want[k][0])} asked"
        for k in sorted(have)
        if have[k] != want[k]
    ]
    if other:
        return f"its item {name!r} holds arrays of other shapes or types than asked ({'; '.join(other[:3])})"
    return None


# A tensorstore read error names the array as Orbax stored it ("layers.mlp.up_proj.gate/0.0.0")
# and the item folder it read ('at local file "/ckpt/0/params/"'): kept to name them in ours.
_ARRAY_IN_ERROR = re.compile(r'Error reading "([^"/]+)(?:/[^"]*)?"')
_FOLDER_IN_ERROR = re.compile(r'at local file "([^"]*)"')
_MAX_DETAIL = 200  # characters of the underlying error kept in ours
_OCDBT_PREFIX = re.compile(r'Error reading "[^"]*" in OCDBT database at local file "[^"]*":\s*')


def _read_error(error: Exception, path: str, step: int) -> CorruptCheckpointError:
    """One line for an Orbax / tensorstore / JSON failure to read `path` (a file or step folder).

    Called only for failures of reads whose request was checked first (the items exist, the
    targets hold the stored entries, shapes and types), so the failure is the files': the step
    is damaged, and `restore_latest_good` may fall back to the one before it.
    """
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    folder, array = _FOLDER_IN_ERROR.search(text), _ARRAY_IN_ERROR.search(text)
    if folder:
        path = os.path.normpath(folder.group(1))
    named = f": array {os.path.basename(path)}/{array.group(1).replace('.', '/')}" if folder and array else ""
    detail = _OCDBT_PREFIX.sub("", text.split(" [tensorstore_spec=")[0]).replace(
        'Error opening "zarr" driver: ', ""
    )
    detail = detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."
    return CorruptCheckpointError(
        f"{path} (step {step}){named}: cannot be read, the checkpoint is damaged ({detail})"
    )


def _closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_reports(previous, report) -> None:
    if not _closed_loop(report.exc_value):
        previous(report)


def _drop_closed_loop_prints(previous, kind, value, tb) -> None:
    if not _closed_loop(value):
        previous(kind, value, tb)


def quiet_orbax_teardown() -> None:
    """Silences the tracebacks tensorstore prints after a failed Orbax restore or save.

    Orbax closes its event loop as soon as one read fails; the completion callbacks of the
    reads still in flight then hit the closed loop, and Python prints each after our one-line
    error, as an "unraisable" report or (printed from a native callback) through
    `sys.excepthook`, sometimes before the failure reaches our `except`. So it is installed once,
    before the first restore or save; every other report still reaches the previous hook.
    """
    hook = sys.unraisablehook
    if getattr(hook, "func", None) is not _drop_closed_loop_reports:
        sys.unraisablehook = functools.partial(_drop_closed_loop_reports, hook)
    hook = sys.excepthook
    if getattr(hook, "func", None) is not _drop_closed_loop_prints:
        sys.excepthook = functools.partial(_drop_closed_loop_prints, hook)


class _StorageFailureFilter(logging.Filter):
    """Drops Orbax's own reports (with tracebacks, one per background thread) of a save that a
    full disk or read-only file system stopped: the caller reports that once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (storage_error(ValueError(record.getMessage())) or (error and storage_error(error)))


_QUIET_ASYNCIO = _StorageFailureFilter()


class _DamagedReadsFilter(logging.Filter):
    """Drops asyncio's late reports ("Task exception was never retrieved") of the reads that
    failed beside the one a restore reported: they name a step folder already refused in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.folders: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {error or ''}"
        return not any(f'local file "{folder}{os.sep}' in text for folder in self.folders)


_QUIET_DAMAGED_READS = _DamagedReadsFilter()


@contextlib.contextmanager
def storage_failures_reported_once() -> Iterator[None]:
    """For a save's (or a run's) life: Orbax's background reports of a storage failure are
    dropped (the caller raises its own one-line error), as are the closed-event-loop tracebacks
    that follow them.

    asyncio reports the failed writes of tensorstore tasks nobody awaited ("Task exception was
    never retrieved") only when those tasks are collected, after the save has ended: its filter
    (which drops storage failures only) stays for the process's life."""
    quiet_orbax_teardown()
    logging.getLogger("asyncio").addFilter(_QUIET_ASYNCIO)  # once: a logger keeps a filter once
    quiet = _StorageFailureFilter()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _host_target(tree_metadata):
    """A numpy restore target mirroring stored array metadata (so nothing lands on a device)."""
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
