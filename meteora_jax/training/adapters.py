"""`train-lora` as a training job: one new (or continued) LoRA adapter on a frozen base, trained
on one task folder with the LM loss, written as a PEFT adapter folder.

The model is a one-adapter MeteoRA mixture with top-1 routing, which equals plain LoRA exactly
(the routing weight is 1), so the engine, the sharded step and the checkpoints are train-gate's:
only the adapter's A and B (`nnx.LoRAParam`) train, and there is no gate term. `--out` is a
PEFT folder (`adapter_config.json`, `adapter_model.safetensors`, rewritten at every checkpoint)
with the run's state in `OUT/training` (an ordinary meteora-jax run folder: steps, metrics.jsonl,
curves.png). A new adapter starts as PEFT's does (A random, B zero), so step 0 is the base model
and the evaluation before the first step gives the base's figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from meteora_jax.config import LlamaConfig
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.prompts import load_tokenizer, pad_token_of
from meteora_jax.data.tasks import read_task_file
from meteora_jax.errors import ConfigError
from meteora_jax.inputs import ADAPTER_NAME, is_real
from meteora_jax.io import checkpoint, checksums
from meteora_jax.io.peft import LoRAAdapter, read_adapter
from meteora_jax.io.peft_write import update_adapter_files
from meteora_jax.io.stacking import AdapterInfo, init_gates, moe_config_for, stack_adapters, unstack_adapters
from meteora_jax.training.distributed import is_main
from meteora_jax.training.loop import Job, RunResult, prepare_out, run
from meteora_jax.training.lora_init import new_adapter, parse_targets
from meteora_jax.training.task_eval import TaskEvaluation, scored_samples
from meteora_jax.training.train_config import LORA_DEFAULTS, RunOptions, TrainConfig
from meteora_jax.training.truncation import check_truncation, heldout_within

RUN_SUBDIR = "training"  # OUT/training: the run state beside the PEFT files
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_TARGETS = 8, 16.0, "all-linear"  # LLaMA-Factory's LoRA defaults
FIXED = {"train_gates": False, "train_adapters": True, "gate_loss_weight": 0.0, "top_k": 1}


def lora_train_config(steps: int, **settings) -> TrainConfig:
    """A `TrainConfig` for train-lora: the adapter alone trains, top-1, no gate term."""
    return TrainConfig(steps=steps, **{**LORA_DEFAULTS, **settings, **FIXED})


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """The adapter a run makes. None: the default (rank 8, alpha 16, all linear projections of
    every layer, plain scaling), or with `init_from` that adapter's own value."""

    rank: int | None = None
    alpha: float | None = None
    targets: str | Sequence[str] | None = None
    layers: Sequence[int] | None = None
    use_rslora: bool | None = None
    dropout: float = 0.0
    init_from: str | None = None  # a PEFT folder to continue

    def __post_init__(self):
        if not (is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"--dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.use_rslora is not None and not isinstance(self.use_rslora, bool):
            raise ConfigError(f"--rslora must be True or False, got {self.use_rslora!r}")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Everything one train-lora run needs. `data_dir` is one task folder (train.jsonl, and
    test.jsonl for the held-out figures); `out` the PEFT folder to write."""

    base: str
    data_dir: str
    out: str
    train: TrainConfig
    data: DataConfig
    lora: LoRASettings = LoRASettings()
    options: RunOptions = dataclasses.field(default_factory=RunOptions)
    force: bool = False

    def __post_init__(self):
        wrong = {k: getattr(self.train, k) for k, v in FIXED.items() if getattr(self.train, k) != v}
        if wrong:
            raise ConfigError(
                f"train-lora trains the adapter alone with top-1 routing and no gate term: {wrong} should be "
                f"{ {k: FIXED[k] for k in wrong} } (build the settings with lora_train_config)"
            )


def _conflicts(lora: LoRASettings, adapter: LoRAAdapter) -> list[str]:
    """The flags given with --init-from that disagree with that adapter."""
    ranks = {m.rank for m in adapter.modules.values()}
    alphas = {m.alpha for m in adapter.modules.values()}
    layers = sorted({layer for layer, _ in adapter.modules})
    given = {
        "--rank": (lora.rank, ranks == {lora.rank}, sorted(ranks)),
        "--alpha": (
            lora.alpha,
            lora.alpha is not None and all(math.isclose(a, lora.alpha) for a in alphas),
            sorted(alphas),
        ),
        "--targets": (
            lora.targets,
            lora.targets is not None and parse_targets(lora.targets) == adapter.projections,
            ",".join(adapter.projections),
        ),
        "--layers": (lora.layers, lora.layers is not None and sorted(set(lora.layers)) == layers, layers),
        "--rslora": (lora.use_rslora, lora.use_rslora == adapter.use_rslora, adapter.use_rslora),
    }
    return [
        f"{flag} {value} (the adapter has {has})" for flag, (value, same, has) in given.items()
        if value is not None and not same
    ]  # fmt: skip


def initial_adapter(lora: LoRASettings, config: LlamaConfig, name: str, seed: int) -> LoRAAdapter:
    """The adapter step 0 starts from: `init_from` read as it is, or a new PEFT-initialised one."""
    if lora.init_from is None:
        return new_adapter(
            name,
            config,
            rank=DEFAULT_RANK if lora.rank is None else lora.rank,
            alpha=DEFAULT_ALPHA if lora.alpha is None else lora.alpha,
            targets=DEFAULT_TARGETS if lora.targets is None else lora.targets,
            layers=lora.layers,
            use_rslora=bool(lora.use_rslora),
            seed=seed,
        )
    adapter = read_adapter(lora.init_from, config, name=name)
    conflicts = _conflicts(lora, adapter)
    if conflicts:
        raise ConfigError(
            f"--init-from {lora.init_from}: {'; '.join(conflicts)}: leave these flags out to continue that "
            "adapter as it is"
        )
    return adapter


def _task_file(data_dir: str, split: str, required: bool) -> str | None:
    path = os.path.join(data_dir, f"{split}.jsonl")
    if os.path.isfile(path):
        return path
    if required:
        hint = ""
        if os.path.isdir(data_dir) and any(
            os.path.isfile(os.path.join(data_dir, e, f"{split}.jsonl")) for e in os.listdir(data_dir)
        ):
            hint = " (it holds task folders: give one of them, e.g. --data DATA/<task>)"
        raise ConfigError(f"--data {data_dir}: no {split}.jsonl; train-lora takes one task folder{hint}")
    return None


def _adapter_name(data_dir: str) -> str:
    """The task folder's name where it is a valid adapter name (recorded in the run's metadata)."""
    name = os.path.basename(os.path.normpath(os.path.abspath(data_dir)))
    return name if ADAPTER_NAME.fullmatch(name) and name not in (".", "..") else "adapter"


def _writer(spec: LoRASpec, config: LlamaConfig, infos: list[AdapterInfo]):
    """on_save: the trained adapter as the PEFT files of `spec.out` (gathered by every process,
    written by process 0)."""
    out = os.path.abspath(spec.out)

    def write(model, step: int) -> None:
        stacks = {p: checksums.host_array(v) for p, v in checkpoint.model_params(model.module).items()}
        [adapter] = unstack_adapters(stacks, infos)
        if is_main():
            update_adapter_files(
                adapter, out, base_model_name_or_path=os.path.abspath(spec.base), config=config,
                lora_dropout=spec.lora.dropout,
            )  # fmt: skip

    return write


def train_lora(spec: LoRASpec) -> RunResult:
    """Trains (or resumes, or extends) the adapter `spec` describes; `.out` of the result is the
    PEFT folder, `.start_evaluation` the held-out figures before the first step of a new run."""
    out = os.path.abspath(spec.out)
    inputs = [("--base", spec.base), ("--data", spec.data_dir), ("--init-from", spec.lora.init_from)]
    name = _adapter_name(spec.data_dir)
    tokenizer = load_tokenizer(spec.base)
    tasks = {name: read_task_file(_task_file(spec.data_dir, "train", True), 0, [name])}
    check_truncation(tasks, tokenizer, spec.data.seq_len, command="train-lora")  # before --out is touched
    prepare_out(out, inputs, force=spec.force, run_dir=os.path.join(out, RUN_SUBDIR), command="train-lora")
    config = LlamaConfig.from_hf(spec.base)
    test = _task_file(spec.data_dir, "test", False)
    evaluation = None
    if test is not None:
        samples = scored_samples(tokenizer, read_task_file(test, 0, [name]))
        samples = heldout_within(samples, [len(s.ids) for s in samples], spec.data.seq_len, "train-lora")
        if samples:
            evaluation = TaskEvaluation(
                samples, pad_token_of(tokenizer), spec.data.batch_size // spec.train.grad_accum
            )
    adapter = initial_adapter(spec.lora, config, name, spec.train.seed)
    infos = [AdapterInfo.of(adapter)]

    def mixture():
        moe = moe_config_for([adapter], top_k=1, dropout=spec.lora.dropout)
        params = stack_adapters([adapter], config, moe)
        params.update(init_gates(config, moe, spec.train.seed))  # (in, 1) gates: top-1 of 1, weight 1
        return moe, params, infos

    job = Job(
        command="train-lora",
        base=spec.base,
        run_dir=os.path.join(out, RUN_SUBDIR),
        train=spec.train,
        data=spec.data,
        tokenizer=tokenizer,
        tasks=tasks,
        mixture=mixture,
        options=spec.options,
        evaluation=evaluation,
        evaluate_at_start=True,
        on_save=_writer(spec, config, infos),
    )
    return dataclasses.replace(run(job), out=out)
