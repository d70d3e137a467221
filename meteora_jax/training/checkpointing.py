"""A training run's folder: an ordinary meteora-jax checkpoint whose steps also hold the state
a run needs to go on exactly where it stopped.

Each step (an Orbax `CheckpointManager` step, written asynchronously and atomically) holds
- `params` and `meta`: the MeteoRA parameters and metadata of `io.checkpoint`, so
  `load_model(base, gates=OUT)` and `meteora-jax generate --ckpt OUT` read a run folder as is;
- `opt`: the optimizer state (AdamW moments and step count), flat {path: array};
- `data`: every process's data-iterator position (Grain's checkpoint handler, one JSON file
  per process);
- `run`: JSON: the step, the training and data settings, the seed of the dropout stream
  (whose position is the step) and the run's history of settings changes.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Collection, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from meteora_jax.data.pipeline import DataStateMismatch
from meteora_jax.errors import CheckpointError
from meteora_jax.io import checkpoint
from meteora_jax.io.checkpoint import CorruptCheckpointError
from meteora_jax.io.stacking import ParamPath

OPT_ITEM, DATA_ITEM, RUN_ITEM = "opt", "data", "run"
RUN_FORMAT = "meteora-jax-train"


def flat_state(state: nnx.State) -> dict[str, jax.Array]:
    """An NNX state as {"a/b/c": array}: string keys Orbax and the checksums can name."""
    return {"/".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


class RunCheckpoints:
    """The Orbax manager of a run folder: asynchronous saves, keep-N, and restore with fallback
    from a corrupt latest step to the previous good one."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        handlers = {
            checkpoint.PARAMS_ITEM: ocp.StandardCheckpointHandler(),
            checkpoint.META_ITEM: ocp.JsonCheckpointHandler(),
            OPT_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: grain.checkpoint.CheckpointHandler(),
            RUN_ITEM: ocp.JsonCheckpointHandler(),
        }
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(
        self,
        step: int,
        params: Mapping[ParamPath, jax.Array],
        shared: dict,
        meta,
        opt: dict,
        batches,
        run: dict,
    ) -> None:
        """Starts saving `step` in the background (the loop goes on; `wait` blocks until done).
        `params` leaves out the arrays of the folder's shared file, whose records are `shared`."""
        items = dict(checkpoint.save_args(params, meta, {OPT_ITEM: opt}, shared=shared).items())
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(batches)
        items[RUN_ITEM] = ocp.args.JsonSave({"format": RUN_FORMAT, **run})
        if not self.manager.save(step, args=ocp.args.Composite(**items)):  # Orbax skips, silently,
            raise CheckpointError(  # a step not above every step folder it sees
                f"{self.directory}: step {step} was not saved: Orbax holds a later step "
                f"{self.manager.latest_step()} there; move that folder away"
            )

    def reload(self) -> None:
        """Re-reads the steps on disk (after a bad step was set aside, so it can be saved again)."""
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_run(self, step: int) -> dict:
        """The `run` JSON of `step`."""
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(**{RUN_ITEM: ocp.args.JsonRestore()}))[
                RUN_ITEM
            ]
        except Exception as e:  # noqa: BLE001 (Orbax raises many types for unreadable files)
            raise CheckpointError(
                f"{self.directory} step {step}: its run state cannot be read ({e})"
            ) from None
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{self.directory} step {step}: not a step of a meteora-jax training run")
        return data

    def restore(self, step: int, opt_template: dict, batches) -> tuple[checkpoint.Checkpoint, dict]:
        """(params and metadata, restored optimizer arrays) of `step`; moves `batches` to the
        step's data position (None: leaves them at their start). Raises DataStateMismatch when
        the position belongs to other data or settings, CheckpointError for anything unreadable
        or corrupt."""
        ckpt = checkpoint.restore(self.directory, step, extra_items={OPT_ITEM: opt_template})
        if batches is None:
            return ckpt, ckpt.extra[OPT_ITEM]
        try:
            self.manager.restore(
                step, args=ocp.args.Composite(**{DATA_ITEM: grain.checkpoint.CheckpointRestore(batches)})
            )
        except (CheckpointError, DataStateMismatch):
            raise
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"{self.directory} step {step}: its data position cannot be read ({e})"
            ) from None
        return ckpt, ckpt.extra[OPT_ITEM]


def unfinished_steps(directory: str, finished: Collection[int]) -> list[int]:
    """The numbered folders of `directory` that are not finished steps (`finished`)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and int(name) not in finished and os.path.isdir(os.path.join(directory, name))
    )


def set_aside(directory: str, step: int, reason: str) -> str:
    """Renames a bad step folder out of the way (never deletes it) and warns naming it."""
    src = os.path.join(directory, str(step))
    dst = os.path.join(directory, f".bad-step-{step}-{int(time.time())}")
    os.replace(src, dst)
    warnings.warn(
        f"{directory}: step {step} is unreadable or corrupt ({reason}); it was moved to {dst} and the "
        "previous good step is used",
        UserWarning,
        stacklevel=2,
    )
    return dst
