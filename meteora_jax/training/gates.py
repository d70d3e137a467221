"""`train-gate` as a training job: the mixture of existing adapters, the gate objective, and
held-out routing accuracy as its evaluation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.prompts import load_tokenizer, pad_token_of
from meteora_jax.data.samples import load_heldout
from meteora_jax.data.tasks import load_tasks
from meteora_jax.errors import ConfigError
from meteora_jax.io import checkpoint, gate_sources
from meteora_jax.training.loop import Job, RunResult, prepare_out, run
from meteora_jax.training.routing_eval import RoutingEvaluation
from meteora_jax.training.train_config import RunOptions, TrainConfig
from meteora_jax.training.truncation import check_truncation, heldout_within


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything one gate-training run needs: the model, the data, where to write, the settings."""

    base: str
    adapters: Mapping[str, str]  # name -> PEFT folder, in gate order
    data_dir: str
    out: str
    train: TrainConfig
    data: DataConfig
    options: RunOptions = dataclasses.field(default_factory=RunOptions)
    tasks: Sequence[str] | None = None
    init_from: str | None = None  # a checkpoint of these adapters: start from its gates and stacks
    force: bool = False


def train(spec: RunSpec) -> RunResult:
    """Trains (or resumes, or extends) the gate-training run `spec` describes in `spec.out`."""
    inputs = [("--base", spec.base), ("--data", spec.data_dir)]
    inputs += [(f"--adapter {name}", folder) for name, folder in spec.adapters.items()]
    inputs += [("--init-from", spec.init_from)] if spec.init_from is not None else []
    names = list(spec.adapters)
    if len(names) == 1 and not spec.train.train_adapters:
        raise ConfigError(
            f"train-gate with one adapter ({names[0]}) trains nothing: every token goes to it whatever its "
            "gate says, so the gates get no gradient; give two adapters or more, or --train-adapters "
            "(or train-lora) to train the adapter"
        )
    tokenizer = load_tokenizer(spec.base)
    tasks = load_tasks(spec.data_dir, names, tasks=spec.tasks, split="train")
    check_truncation(tasks, tokenizer, spec.data.seq_len, command="train-gate")  # before --out is touched
    if spec.init_from is not None:
        _check_init(spec)
    prepare_out(spec.out, inputs, force=spec.force, command="train-gate")
    evaluation = None
    if any(os.path.isfile(os.path.join(spec.data_dir, t, "test.jsonl")) for t in names):
        heldout = load_heldout(spec.data_dir, names, tokenizer, tasks=spec.tasks, split="test")
        heldout = {
            task: heldout_within(s, [len(x.input_ids) for x in s], spec.data.seq_len, "train-gate")
            for task, s in heldout.items()
        }
        if any(heldout.values()):
            evaluation = RoutingEvaluation(
                heldout, pad_token_of(tokenizer), spec.data.batch_size // spec.train.grad_accum
            )
    job = Job(
        command="train-gate",
        base=spec.base,
        run_dir=spec.out,
        train=spec.train,
        data=spec.data,
        tokenizer=tokenizer,
        tasks=tasks,
        mixture=lambda: _mixture(spec),
        options=spec.options,
        evaluation=evaluation,
    )
    return run(job)


def _mixture(spec: RunSpec):
    """The run's starting mixture: the adapters with seeded gates, or `init_from`'s gates and
    (possibly trained) stacks (its adapters checked by `_check_init`)."""
    if spec.init_from is None:
        return gate_sources.fuse(spec.base, dict(spec.adapters), None, spec.train.top_k, seed=spec.train.seed)
    return gate_sources.fuse(spec.base, None, spec.init_from, spec.train.top_k)


def _check_init(spec: RunSpec) -> None:
    """Refuses an `init_from` checkpoint whose adapters are not the spec's, in its order (reads
    only its metadata)."""
    _, meta = checkpoint.read_meta(spec.init_from)
    if list(meta.adapter_names) != list(spec.adapters):
        raise ConfigError(
            f"--init-from {spec.init_from} holds the adapters {list(meta.adapter_names)}; the run names "
            f"{list(spec.adapters)} (the same adapters, in the same order)"
        )
