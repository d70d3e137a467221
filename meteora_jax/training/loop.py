"""The training engine `train-gate` and `train-lora` share: load, resume, step, log, evaluate,
checkpoint, until `steps`.

`run(job)` trains, resumes or extends the run a `Job` describes (`training.gates` and
`training.adapters` build one). Running it again on the same run folder resumes from the last
good checkpoint; after a SIGKILL the result equals an uninterrupted run (same batches, same
dropout keys, same optimizer state). Only process 0 writes logs and plots; every process takes
part in checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meteora_jax.api import DTYPES, MeteoRAModel
from meteora_jax.config import MoELoRAConfig
from meteora_jax.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from meteora_jax.data.tasks import Sample
from meteora_jax.errors import ConfigError, TrainingError, describe_os_error, storage_error
from meteora_jax.io import checkpoint, checksums, files
from meteora_jax.io.hf import load_llama
from meteora_jax.io.stacking import AdapterInfo, ParamPath
from meteora_jax.modeling.attention import check_training_length
from meteora_jax.sharding import MESH_AXES, host_to_global, make_mesh
from meteora_jax.training import run_lock
from meteora_jax.training.checkpointing import RUN_ITEM, RunCheckpoints, flat_state
from meteora_jax.training.distributed import barrier, is_main
from meteora_jax.training.resume import RunIdentity, check_schedule_left, restore_last_good
from meteora_jax.training.run_log import METRICS_FILE, RunLog, log
from meteora_jax.training.state import TrainState, split_for_training
from meteora_jax.training.step import batch_sharding, make_train_step
from meteora_jax.training.stopping import RunStopped, StopRequest, stop_requests
from meteora_jax.training.train_config import RunOptions, TrainConfig

GATE_METRICS = ("gate_loss", "gate_accuracy", "gate_tokens")  # logged only with a gate term


Mixture = tuple[
    MoELoRAConfig, dict[ParamPath, np.ndarray], list[AdapterInfo]
]  # what `io.gate_sources.fuse` gives


class Evaluation(Protocol):
    """A held-out evaluation: `evaluation(model, mesh) -> {figure: value}` ({} when there is
    nothing to score) and a one-line `summary` of such a result for the log."""

    def __call__(self, model: MeteoRAModel, mesh: Mesh) -> dict: ...

    def summary(self, result: dict) -> str: ...


@dataclasses.dataclass(frozen=True)
class Job:
    """One run as the engine sees it (the commands build it from their own specs).

    mixture: called once the data has loaded (a bad line fails in a second, not after the
    model): the MeteoRA mixture to put on the base. on_save: called by every process with the
    model after each checkpoint save, and when a rerun finds the run already finished (so a run
    killed between the two is completed). evaluate_at_start: evaluate a new run before its first
    step too (train-lora: the base model's figures, since a new adapter starts at zero).
    """

    command: str  # "train-gate" | "train-lora": the log prefix and the progress bar's label
    base: str
    run_dir: str
    train: TrainConfig
    data: DataConfig
    tokenizer: Any
    tasks: Mapping[str, Sequence[Sample]]  # training samples by task, labelled by adapter index
    mixture: Callable[[], Mixture]
    options: RunOptions = dataclasses.field(default_factory=RunOptions)
    evaluation: Evaluation | None = None
    evaluate_at_start: bool = False
    on_save: Callable[[MeteoRAModel, int], None] | None = None


@dataclasses.dataclass
class RunResult:
    """What a finished run reports: its folder, last step, last metrics, last evaluation and (with
    `evaluate_at_start`) the evaluation before the first step."""

    out: str
    step: int
    metrics: dict
    evaluation: dict
    start_evaluation: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- the output folder


def is_run_folder(directory: str) -> bool:
    """Whether `directory` holds step folders of a meteora-jax training run (a checkpoint written
    by `convert` has steps but no run state), or only its logs or its lock (a run killed before
    it logged anything)."""
    steps = checkpoint.checkpoint_steps(directory)
    if steps:
        return any(os.path.isdir(os.path.join(directory, str(step), RUN_ITEM)) for step in steps)
    ours = (os.path.join(directory, name) for name in (METRICS_FILE, run_lock.LOCK_FILE))
    return any(map(os.path.isfile, ours))


def prepare_out(
    out: str,
    inputs: Sequence[tuple[str, str | None]],
    *,
    force: bool,
    run_dir: str | None = None,
    command: str,
) -> None:
    """Refuses an `out` that would destroy one of `inputs` ((flag, path) pairs) or holds something
    other than a run of ours, whose run folder is `run_dir` (default `out` itself); `force`
    replaces it."""
    files.check_output_path(out, inputs=inputs)
    checkpoint.check_path_text(out, "--out")
    out = os.path.abspath(out)
    run_dir = out if run_dir is None else os.path.abspath(run_dir)
    run_lock.check_not_in_use(run_dir, command)  # not even --force may pull a live run's folder away
    if not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if os.path.isdir(out) and is_run_folder(run_dir) and not force:
        return  # resume (or extend) it
    if not force:
        what = (
            "a checkpoint without run state (as `convert` writes), not"
            if checkpoint.checkpoint_steps(run_dir)
            else "something other than"
        )
        raise TrainingError(
            f"--out {out} holds {what} a meteora-jax {command} run: choose another folder, "
            "or pass --force to replace it"
        )
    if is_main():
        log(command, f"--force: replacing {out}")
        shutil.rmtree(out) if os.path.isdir(out) and not os.path.islink(out) else os.remove(out)
    barrier("prepare-out")


# ----------------------------------------------------------------------------- setup


def build_mesh(sizes: Mapping[str, int], batch_size: int, grad_accum: int) -> Mesh:
    """The device mesh of `--mesh` ({axis: size}), refusing sizes that do not match the devices
    or the batch."""
    try:
        mesh = make_mesh(**{axis: sizes[axis] for axis in MESH_AXES})
    except ConfigError as e:
        raise ConfigError(f"--mesh: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (grad_accum * rows):
        raise ConfigError(
            f"--batch-size {batch_size} does not split into --grad-accum {grad_accum} micro-batches of "
            f"rows shared by data x fsdp = {rows} devices (--mesh {dict(mesh.shape)}): choose a batch size "
            f"divisible by {grad_accum * rows}"
        )
    return mesh


def _global_batch(local: dict, sharding_of, global_shape: tuple[int, int]) -> dict:
    """This host's rows -> global arrays (`jax.make_array_from_process_local_data`)."""
    return {
        k: jax.make_array_from_process_local_data(sharding_of[k], local[k], global_shape) for k in BATCH_KEYS
    }


# ----------------------------------------------------------------------------- the run


class _Run:
    """One `run` call: the model and its step function, then the step loop, which calls the
    checkpoints (`RunCheckpoints`, `resume`), the log (`RunLog`) and the evaluation."""

    def __init__(self, job: Job):
        self.job = job
        self.out = os.path.abspath(job.run_dir)
        self.cfg = job.train
        options = job.options
        self.mesh = build_mesh(options.mesh, job.data.batch_size, self.cfg.grad_accum)
        try:
            check_training_length(options.attention, job.data.seq_len)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.moe, extra, self.infos = job.mixture()
        compute = DTYPES[self.cfg.dtype]
        with jax.set_mesh(self.mesh):
            module = load_llama(
                job.base, self.moe, extra, dtype=compute, param_dtype=jnp.float32, backend=options.backend,
                attention=options.attention, mesh=self.mesh,
            )  # fmt: skip
        self.parts, state, frozen = split_for_training(module, self.cfg)
        with jax.set_mesh(self.mesh):
            self.step_fn = make_train_step(
                self.parts, self.cfg, state, frozen, self.mesh,
                batch_shape=(job.data.batch_size, job.data.seq_len), temperature=self.moe.temperature,
            )  # fmt: skip
            self.state = jax.device_put(state, self.step_fn.state_shardings)
            self.frozen = jax.device_put(frozen, self.step_fn.frozen_shardings)
        self.meta = checkpoint.make_meta(self.moe, self.infos, job.base)
        self.batches = train_batches(
            job.tasks,
            job.tokenizer,
            job.data,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            prefetch=2,
        )
        self.log = RunLog(self.out, job.command, progress=options.progress)
        self.stop = StopRequest()  # the signal that asked the run to stop (set while it trains)
        self.checkpoints: RunCheckpoints | None = None  # opened once the run folder is locked
        self.shared: tuple[set, dict] = (set(), {})  # the arrays saved once (`_shared_params`)

    def resume(self) -> int:
        """Restores the last good step into the state and the log; 0 for a new run."""
        template = jax.tree.map(checksums.host_array, flat_state(self.state.opt))
        identity = RunIdentity(self.moe, self.infos, self.job.base, self.cfg)
        restored = restore_last_good(
            self.out, self.checkpoints, identity, template, self.batches, self.log.say
        )
        if restored is None:
            return 0
        self._place(restored.params, restored.opt)
        self.log.restore(restored.step)
        return restored.step

    def _place(self, params: Mapping, opt: Mapping) -> None:
        """Puts restored host arrays into the train state, sharded as the state is."""
        shardings = self.step_fn.state_shardings

        def put(template_state, sharding_state, values: Mapping, key_of):
            pairs = []
            flat_sharding = dict(nnx.to_flat_state(sharding_state))
            for path, var in nnx.to_flat_state(template_state):
                value = np.asarray(values[key_of(path)]).astype(var.get_value().dtype)
                pairs.append((path, var.replace(host_to_global(value, flat_sharding[path].get_value()))))
            return nnx.from_flat_state(pairs)

        new_params = put(self.state.params, shardings.params, params, lambda p: tuple(str(x) for x in p))
        new_opt = put(self.state.opt, shardings.opt, opt, lambda p: "/".join(str(x) for x in p))
        self.state = TrainState(new_params, new_opt)

    # -- the loop

    def run(self) -> RunResult:
        """Trains while holding the run folder's lock (taken only now: a run refused while
        setting up leaves no folder behind)."""
        try:
            with (
                run_lock.hold(self.out, self.job.command),
                checkpoint.storage_failures_reported_once(),
                stop_requests() as self.stop,
            ):
                return self._run_locked()
        except RunStopped as e:  # the saves under way have finished (`_run_locked`)
            raise RunStopped(
                f"{e}; {self._last_good()}: rerun the same command to resume from there", e.signum
            ) from None
        except Exception as e:
            storage = storage_error(e)
            if storage is None:
                raise
            raise TrainingError(
                f"{self._describe_storage(storage)}: training stopped; {self._last_good()}"
            ) from None
        finally:
            self.batches.close()

    def _last_good(self) -> str:
        kept = checkpoint.checkpoint_steps(self.out)
        return f"the last good checkpoint is step {kept[-1]} in {self.out}" if kept else "nothing was saved"

    def _describe_storage(self, error: OSError) -> str:
        """ "PATH: cause"; a file of a step being saved (Orbax's temporary folders, which the user
        never named) is said as the run folder and the step."""
        if error.filename:
            first = os.path.relpath(os.path.abspath(os.fsdecode(error.filename)), self.out).split(os.sep)[0]
            step = first.split(".", 1)[0]
            if step.isdigit():
                return f"{self.out}: {error.strerror} (saving step {step})"
        return describe_os_error(error, self.out)

    def _run_locked(self) -> RunResult:
        job, cfg = self.job, self.cfg
        self.checkpoints = RunCheckpoints(self.out, cfg.keep)
        try:
            with jax.set_mesh(self.mesh):
                start = self.resume()
                self.shared = self._shared_params()
                if start >= cfg.steps:
                    self.log.say(
                        f"{self.out} already holds step {start} (>= --steps {cfg.steps}): nothing to do"
                    )
                    if job.on_save is not None:
                        job.on_save(self._model(), start)
                    return RunResult(self.out, start, self.log.last, {})
                check_schedule_left(start, cfg, self.out)
                self.log.rewrite()  # a resumed run's log keeps its steps up to `start` only
                first = self.evaluate(0) if start == 0 and job.evaluate_at_start else {}
                last, evaluation = self._loop(start)
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()
        self.log.write_curves()
        return RunResult(self.out, cfg.steps, last, evaluation, first)

    def _loop(self, start: int) -> tuple[dict, dict]:
        """Steps `start` .. `steps`. A step's metrics are read back while the next one runs, except
        where the run saves or evaluates, so the device never waits for the host's logging."""
        cfg, job = self.cfg, self.job
        shape = (job.data.batch_size, job.data.seq_len)
        shardings = {k: batch_sharding(self.mesh, shape) for k in BATCH_KEYS}
        key = jax.random.key(cfg.seed)
        self.log.start(start, cfg.steps)
        pending, last, evaluation = None, {}, {}
        clock = time.perf_counter()
        for step in range(start, cfg.steps):
            local = next(self.batches)
            truncated = self.batches.last_stats.num_truncated
            batch = _global_batch(local, shardings, shape)
            self.state, metrics = self.step_fn(self.frozen, self.state, batch, key)
            if pending is not None:
                last = self._finish(pending, clock)  # the previous step, now that this one runs
                clock = time.perf_counter()
            pending = (step + 1, metrics, truncated)
            done = step + 1
            if cfg.saves_at(done) or cfg.evaluates_at(done):
                last = self._finish(pending, clock)
                pending, clock = None, time.perf_counter()
            if cfg.saves_at(done):
                self.save(done)  # before any evaluation: a failing one loses no step
            if cfg.evaluates_at(done):
                evaluation = self.evaluate(done)
            if self.stop.signum is not None and done < cfg.steps:
                self._stop(pending, clock, done)
        self.log.close()
        return last, evaluation

    def _stop(self, pending, clock, done: int) -> None:
        """Saves step `done` (unless just saved) and raises RunStopped, as the signal asked."""
        if pending is not None:
            self._finish(pending, clock)
        if not self.cfg.saves_at(done):
            self.save(done)
        self.log.close()
        name = signal.Signals(self.stop.signum).name
        raise RunStopped(f"{name} after step {done}", self.stop.signum)

    def _finish(self, pending, clock) -> dict:
        """Checks and logs a finished step's metrics; a non-finite loss stops the run."""
        step, metrics, truncated = pending
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        gate_term = self.cfg.gate_loss_weight > 0
        if not gate_term:
            values = {k: v for k, v in values.items() if k not in GATE_METRICS}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
            self.checkpoints.wait()  # the saves under way are of good steps: let them finish
            shown = ("loss", "lm_loss", "gate_loss", "grad_norm") if gate_term else ("loss", "grad_norm")
            raise TrainingError(
                f"step {step}: the loss is not finite ({', '.join(f'{k} {values[k]}' for k in shown)}): "
                f"training stopped; {self._last_good()}"
            )
        seconds = max(time.perf_counter() - clock, 1e-9)
        record = {
            "step": step,
            **values,
            "tokens_per_s": values["lm_tokens"] / seconds,
            "truncated": truncated,
        }
        if truncated:
            self.log.say(
                f"step {step}: {truncated} samples longer than --seq-len {self.job.data.seq_len} "
                "were truncated"
            )
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.log.append(record)
        shown = {"loss": f"{values['loss']:.4g}"}
        if gate_term:
            shown["gate_acc"] = f"{values['gate_accuracy']:.3f}"
        self.log.advance(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
        return record

    def _model(self) -> MeteoRAModel:
        return MeteoRAModel(self.parts.module(self.state.params, self.frozen), self.infos)

    def evaluate(self, step: int) -> dict:
        """The job's held-out evaluation of the model at `step`, logged; {} without one."""
        evaluation = self.job.evaluation
        result = {} if evaluation is None else evaluation(self._model(), self.mesh)
        if result:
            self.log.append({"step": step, "eval": result})
            self.log.say(f"step {step}: {evaluation.summary(result)}")
        return result

    def _shared_params(self) -> tuple[set, dict]:
        """(paths, checksum records) of the MeteoRA arrays that never change in this run (the
        frozen adapter stacks and the scales), written once to the run folder, not at every save."""
        params = checkpoint.model_params(self.parts.module(self.state.params, self.frozen))
        trained = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(self.state.params)}
        frozen = {path: value for path, value in params.items() if path not in trained}
        on_disk = checkpoint.shared_records(self.out)
        barrier("shared-checked")  # every process decides on the same file before process 0 writes
        if on_disk is None:
            records = checkpoint.write_shared(self.out, frozen)
            barrier("shared-written")
        else:
            records = checkpoint.shared_records_of(frozen)
            changed = sorted(k for k in records if on_disk.get(k, {}).get("sha256") != records[k]["sha256"])
            changed += sorted(on_disk.keys() ^ records.keys())
            if changed:
                raise ConfigError(
                    f"cannot resume {self.out}: the adapters' weights differ from the ones it was trained "
                    f"with (e.g. {changed[0]}); use another --out"
                )
        return set(frozen), records

    def save(self, step: int) -> None:
        module = self.parts.module(self.state.params, self.frozen)
        run = {
            "step": step,
            "train": self.cfg.to_json(),
            "data": dataclasses.asdict(self.job.data),
            "seed": self.cfg.seed,
            "processes": jax.process_count(),
        }
        shared_paths, shared_records = self.shared
        params = {p: v for p, v in checkpoint.model_params(module).items() if p not in shared_paths}
        self.checkpoints.save(
            step, params, shared_records, self.meta, flat_state(self.state.opt), self.batches, run
        )
        if self.job.on_save is not None:
            self.job.on_save(MeteoRAModel(module, self.infos), step)


def run(job: Job) -> RunResult:
    """Trains (or resumes, or extends) the run `job` describes; see the module docstring. The
    caller has checked its output folder (`prepare_out`). The run folder stays locked meanwhile."""
    return _Run(job).run()
