"""Finding where a run goes on from: the last good step of its folder, checked against the run now
asked for. A step that cannot be read is set aside (renamed, never deleted) and the one before it
tried; a step of another model, or with settings that change the trained state's shapes, is
refused with nothing changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from meteora_jax.config import MoELoRAConfig
from meteora_jax.data.pipeline import DataStateMismatch
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.io import checkpoint, files
from meteora_jax.io.stacking import AdapterInfo
from meteora_jax.training.checkpointing import RunCheckpoints, set_aside, unfinished_steps
from meteora_jax.training.distributed import barrier, is_main
from meteora_jax.training.train_config import SHAPE_SETTINGS, TrainConfig


@dataclasses.dataclass(frozen=True)
class Restored:
    """A step read back: its number, and its trained parameters and optimizer state (host arrays,
    keyed as saved)."""

    step: int
    params: Mapping
    opt: Mapping


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a saved step must agree with to be resumed by this run."""

    moe: MoELoRAConfig
    infos: Sequence[AdapterInfo]
    base: str
    train: TrainConfig


def restore_last_good(
    out: str,
    checkpoints: RunCheckpoints,
    identity: RunIdentity,
    template: Mapping,
    batches,
    say: Callable[[str], None],
) -> Restored | None:
    """The last good step of `out` restored into `template` (the optimizer state's host layout),
    with the data stream `batches` put back where it was; None for a new run."""
    finished = checkpoint.checkpoint_steps(out)
    for step in unfinished_steps(out, finished):
        # Orbax counts any numbered folder as a step and silently skips saving below it.
        _set_aside(out, step, "a step folder without metadata: not a finished step", checkpoints)
    for step in reversed(finished):
        where = f"{out} (step {step})"
        try:
            _, meta = checkpoint.read_meta(out, step)
            run = checkpoints.read_run(step)
        except checkpoint.CorruptCheckpointError as e:
            _set_aside(out, step, str(e), checkpoints)
            continue
        _check_same_model(meta, identity, where)
        changes = _check_settings(run, identity.train, where)
        try:
            ckpt, opt = checkpoints.restore(step, template, batches)
        except checkpoint.CorruptCheckpointError as e:
            _set_aside(out, step, str(e), checkpoints)
            continue
        except CheckpointError as e:  # readable, but not into this run's state
            raise ConfigError(
                f"cannot resume {where}: {e}. Nothing was changed; use another --out for a new run"
            ) from None
        except DataStateMismatch as e:
            ckpt, opt = _with_new_data(out, step, e, checkpoints, template, identity.train, say)
        horizon = run.get("train", {}).get("decay_steps") or run.get("train", {}).get("steps")
        if horizon != identity.train.horizon:
            say(
                f"the schedule's horizon changes from {horizon} to {identity.train.horizon} steps: "
                f"learning rates from step {step} on follow the new cosine "
                "(set --decay-steps to keep it fixed)"
            )
        if changes:
            say(f"resuming step {step} with changed settings: {'; '.join(changes)}")
        say(f"resumed {out} at step {step}")
        return Restored(step, ckpt.params, opt)
    return None


def check_schedule_left(start: int, train: TrainConfig, where: str) -> None:
    """Refuses steps that would all run at learning rate 0: the cosine reaches 0 at the horizon
    (`--decay-steps`) and stays there, so extending a run past it changes nothing."""
    if start >= train.horizon:
        raise ConfigError(
            f"cannot extend {where} from step {start} to --steps {train.steps}: the learning rate is 0 from "
            f"step {train.horizon} (--decay-steps {train.horizon}) on, so these steps would train nothing; "
            "raise --decay-steps (or leave it out: the cosine then ends at --steps)"
        )


def _with_new_data(out, step, mismatch: DataStateMismatch, checkpoints, template, train, say):
    """Step `step`'s weights and optimizer with the data stream from its start, when the run
    allows it (`new_data`); otherwise the refusal, naming what changed and the ways on."""
    if not train.new_data:
        raise ConfigError(
            f"cannot resume {out} at step {step}: its data or data settings changed ({mismatch}). "
            f"Nothing was changed. Pass --new-data to go on from step {step} with them (the data "
            "stream starts afresh), or another --out for a new run"
        )
    changed = ", ".join(mismatch.changes)
    say(f"step {step}: the data changed ({changed}); going on with it, the data stream from its start")
    return checkpoints.restore(step, template, None)


def _set_aside(out: str, step: int, reason: str, checkpoints: RunCheckpoints) -> None:
    if is_main():
        set_aside(out, step, reason)
    barrier(f"set-aside-{step}")
    checkpoints.reload()


def _shape_of(info: AdapterInfo) -> dict:
    """An adapter's ranks, alphas and modules (not where it was read from)."""
    return {**info.to_json(), "source": None}


def _check_same_model(meta, identity: RunIdentity, where: str) -> None:
    moe, problems = identity.moe, []
    if list(meta.adapter_names) != list(moe.adapter_names):
        problems.append(f"adapters {list(meta.adapter_names)} saved, {list(moe.adapter_names)} given")
    elif [_shape_of(a) for a in meta.adapters] != [_shape_of(a) for a in identity.infos]:
        problems.append("the adapters' ranks, alphas or modules differ from the saved ones")
    if (tuple(meta.targets), meta.rank) != (tuple(moe.targets), moe.rank):
        problems.append(
            f"targets/rank {list(meta.targets)}/{meta.rank} saved, {list(moe.targets)}/{moe.rank} given"
        )
    files.raise_problems(ConfigError, f"cannot resume {where}", problems)
    checkpoint.check_base(meta, identity.base, where)


def _check_settings(run: dict, train: TrainConfig, where: str) -> list[str]:
    """Refuses shape-changing settings that differ; returns notes on the others that changed."""
    saved = run.get("train", {})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # what an older run omits
    changed = [k for k in SHAPE_SETTINGS if saved.get(k, defaults[k]) != getattr(train, k)]
    if changed:
        name = changed[0]
        raise ConfigError(
            f"cannot resume {where}: it was trained with {name}={saved.get(name)!r}, now {name}="
            f"{getattr(train, name)!r} (--{name.replace('_', '-')}); use another --out"
        )
    now = train.to_json()
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now) if k in saved and saved[k] != now[k]]
