"""`meteora-jax demo`: MeteoRA's experiment end to end on the embedded tasks, cached by stage.

Stages, each in its own folder under OUT:
  setup/          the base (a tiny LLaMA pre-trained on copying) and the task folders;
  composite/      composite-3 and composite-5 prompts over the test splits (numbered layout), and
                  the task folders plus labelled composite samples (the second gate recipe's data);
  lora/<task>/    one PEFT adapter per task (`train-lora`), trained on its own task's samples;
  gate/           the paper's recipe: gates and adapter stacks trained on single-task samples;
  gate-composite/ the labelled recipe: from gate/, the gates alone trained on single-task and
                  labelled composite samples (each sub-task's tokens carry its own label);
  eval/peft/      base, each task's own adapter and the averaged adapters (the PEFT adapters);
  eval/meteora/, eval/meteora-composite/   the fused model routed by each recipe's gates;
  report/         report.md, results.json, the routing view of a composite prompt, the curves.

A stage records its key (a hash of the spec it runs, paths taken relative to OUT, and of the keys
of the stages it reads) in OUT/stages/<stage>.json when it starts and marks it done when it ends.
A rerun skips a done stage whose key still matches, resumes a started one (the training runs
resume from their checkpoints), and rebuilds a stage whose key changed, and with it everything
downstream. Another gate variant is one more gate stage, its eval stage and a row in `ROWS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence

from meteora_jax.config import TOP_K
from meteora_jax.data.composite import build_composite, write_composite
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.demo.pretrain import PretrainSettings
from meteora_jax.demo.setup import DemoBaseSettings, build_demo_base, write_labelled_composite_data
from meteora_jax.demo.summary import write_report
from meteora_jax.errors import ConfigError, OutputExistsError
from meteora_jax.evaluation.eval_run import EvalSpec, evaluate
from meteora_jax.evaluation.runner import EvalSettings
from meteora_jax.inputs import is_int, is_real
from meteora_jax.io.files import check_output_path, write_text_atomic
from meteora_jax.training.adapters import LoRASettings, LoRASpec, lora_train_config, train_lora
from meteora_jax.training.gates import RunSpec, train
from meteora_jax.training.lora_init import parse_targets
from meteora_jax.training.train_config import RunOptions, TrainConfig

STAGES_DIR = "stages"
COMPOSITE_FILE, METRICS_FILE = "composite.jsonl", "metrics.json"
# Every demo task is scored by exact match with case kept (the default lower-cases, which would let
# a copy of "upper: abc" pass as "ABC").
DEMO_METRICS = {"*": {"metrics": ["exact_cased"]}}
# The adapters' projections: all but q_proj / k_proj. In a composite prompt the first layers' gates
# cannot tell the lines' tasks apart (their inputs hold the token, not yet its question), so they
# choose near chance there; q / k deltas routed that way bend the attention that finds which question
# a line answers, and the later gates lose the line's task with it (docs/demo_design.md).
ATTENTION_SAFE_TARGETS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Report row -> (the eval stage that measured it, the eval mode), in table order.
ROWS = {
    "base": ("eval-peft", "base"),
    "adapter": ("eval-peft", "adapter"),
    "meteora": ("eval-meteora", "meteora"),
    "meteora-labelled": ("eval-meteora-composite", "meteora"),
    "merged": ("eval-peft", "merged"),
}


# (fields, test, what the test wants) of DemoSettings' numbers; 0 means off for clip / gate term / warmup
_CHECKS = (
    (
        ("batch_size", "seq_len", "save_every", "lora_steps", "lora_rank", "gate_steps", "top_k")
        + ("eval_limit", "composite_samples", "composite_sets", "max_new_tokens", "eval_batch_size")
        + ("labelled_steps", "labelled_samples"),
        lambda v: is_int(v) and v >= 1,
        "an integer >= 1",
    ),
    (("lora_warmup_steps",), lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("gate_seed",), lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    (
        ("lora_lr", "lora_alpha", "gate_lr", "labelled_lr", "routing_temperature")
        + ("composite_routing_temperature",),
        lambda v: is_real(v) and math.isfinite(v) and v > 0,
        "a number > 0",
    ),
    (
        ("clip_norm", "gate_loss_weight", "gate_routing_noise"),
        lambda v: is_real(v) and math.isfinite(v) and v >= 0,
        "a number >= 0",
    ),
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes and recipe (`fast()`: a tiny version for tests and a quick look).

    Adapters: `train-lora` at `lora_lr` for `lora_steps` on `lora_targets`, each on its own task's
    samples. Gates, the paper's recipe: `train-gate` at `gate_lr` for `gate_steps` on single-task
    samples, training the adapter stacks with them (as the reference did) on the LM loss of the
    responses plus `gate_loss_weight` x the gate term. The labelled recipe: from those gates and
    stacks, the gates alone for `labelled_steps` at `labelled_lr` on the single-task samples plus
    `labelled_samples` labelled composite samples. Training clips at `clip_norm` and saves every
    `save_every` steps (what a killed run resumes from). `gate_seed` seeds both gate runs (the
    gates' start, dropout, the data order): other seeds show how far the figures move.
    `gate_routing_noise`: the paper recipe's `train-gate --routing-noise` (docs/demo_design.md).
    Evaluation: greedy, `eval_limit` test samples per task and, for each n of `composite_sizes`,
    `composite_sets` task lists (drawn with seeds 0, 1, ...) of `composite_samples` composite-n
    prompts (the default: 64 prompts, each with its own order, since a figure over a few orders
    says more about them than about the gates), routed at `composite_routing_temperature`
    (single-task prompts at `routing_temperature`)."""

    base: DemoBaseSettings = DemoBaseSettings()
    batch_size: int = 8
    seq_len: int = 192
    clip_norm: float = 1.0
    save_every: int = TrainConfig.save_every
    lora_steps: int = 450
    lora_warmup_steps: int = 10
    lora_lr: float = 3e-3
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ATTENTION_SAFE_TARGETS
    gate_steps: int = 600
    gate_lr: float = 3e-3
    gate_loss_weight: float = TrainConfig.gate_loss_weight  # the paper's
    gate_seed: int = TrainConfig.seed
    gate_routing_noise: float = TrainConfig.routing_noise
    labelled_steps: int = 200
    labelled_lr: float = 1e-3
    labelled_samples: int = 8192
    top_k: int = TOP_K
    eval_limit: int = 64
    composite_sizes: tuple[int, ...] = (3, 5)
    composite_sets: int = 64
    composite_samples: int = 1
    max_new_tokens: int = 96
    eval_batch_size: int = 16
    routing_temperature: float = 1.0
    composite_routing_temperature: float = 1.0

    def __post_init__(self):
        bad = [
            f"{n}={getattr(self, n)!r} ({what})"
            for names, ok, what in _CHECKS
            for n in names
            if not ok(getattr(self, n))
        ]
        if bad:
            raise ConfigError("demo settings: " + ", ".join(bad))
        parse_targets(self.lora_targets, "demo settings: lora_targets")
        sizes = self.composite_sizes
        if not sizes or not all(is_int(n) and n >= 2 for n in sizes) or len(set(sizes)) != len(sizes):
            raise ConfigError(f"demo settings: composite_sizes={sizes!r} (distinct integers >= 2)")
        if len(self.base.tasks) < max(sizes):
            raise ConfigError(
                f"demo settings: tasks={list(self.base.tasks)}: composite-{max(sizes)} prompts need "
                f"{max(sizes)} tasks"
            )
        # the composite prompts are cut from the test splits, each test sample used once per list
        if self.composite_samples > self.base.test:
            raise ConfigError(
                f"demo settings: composite_samples={self.composite_samples} is above the {self.base.test} "
                "test samples per task"
            )

    @classmethod
    def fast(cls) -> DemoSettings:
        base = DemoBaseSettings(
            tasks=("upper", "sort", "shift"), train=32, numbered=8, test=8,
            pretrain_samples=64, layers=2, hidden=32,
            pretrain=PretrainSettings(steps=8, batch_size=8, seq_len=160, lr=3e-3),
        )  # fmt: skip
        return cls(
            base=base, batch_size=8, seq_len=160, lora_steps=4, gate_steps=4, labelled_steps=4,
            labelled_samples=16, eval_limit=4, composite_sizes=(3,), composite_sets=1, composite_samples=2,
            max_new_tokens=8, eval_batch_size=4,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CompositeSpec:
    """The composite stage: prompts over DATA's test splits and the labelled recipe's data."""

    data: str
    out: str
    sizes: tuple[int, ...]
    sets: int
    samples: int
    labelled_samples: int
    seed: int
    metrics: dict  # the metrics file's table


def build_composites(spec: CompositeSpec) -> None:
    """OUT/composite.jsonl: per size n, `sets` task lists (seeds 0, 1, ...) of `samples` numbered
    composite-n prompts; OUT/data/: DATA's task folders plus labelled composite samples;
    OUT/metrics.json: the scoring of the demo's tasks (`spec.metrics`)."""
    lines = [
        line
        for n in spec.sizes
        for seed in range(spec.sets)
        for line in build_composite(spec.data, n=n, samples=spec.samples, seed=seed, layout="numbered")
    ]
    write_composite(lines, os.path.join(spec.out, COMPOSITE_FILE), force=True)
    write_text_atomic(os.path.join(spec.out, METRICS_FILE), json.dumps(spec.metrics))
    write_labelled_composite_data(
        spec.data, os.path.join(spec.out, "data"), samples=spec.labelled_samples, counts=spec.sizes,
        seed=spec.seed,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Stage:
    """One cached step: its name, the folder it writes, the settings its key hashes, the stages
    it reads, how to run it, and whether an unfinished run of it can continue."""

    name: str
    folder: str
    settings: dict
    needs: tuple[str, ...]
    run: Callable[[], object]
    resumes: bool = False  # True: an unfinished run continues in its folder (the training runs)


def _key(settings: dict, upstream: Sequence[str]) -> str:
    text = json.dumps({"settings": settings, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DemoRun:
    """The stages of one demo folder and their records."""

    def __init__(self, out: str, settings: DemoSettings, *, progress: bool = True):
        self.out = os.path.abspath(out)
        self.settings = settings
        self.progress = progress
        self.setup = self.path("setup")
        self.base = os.path.join(self.setup, "base")
        self.data = os.path.join(self.setup, "data")
        self.tasks = tuple(settings.base.tasks)
        self.stages = self._stages()  # every spec is built, and so checked, before anything runs

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage_folder(self, name: str) -> str:
        return next(s.folder for s in self.stages if s.name == name)

    def _stages(self) -> list[Stage]:
        """Every stage in run order."""
        s = self.settings
        composite = CompositeSpec(
            data=self.data, out=self.path("composite"), sizes=s.composite_sizes, sets=s.composite_sets,
            samples=s.composite_samples, labelled_samples=s.labelled_samples, seed=s.base.seed,
            metrics=DEMO_METRICS,
        )  # fmt: skip
        loras = [
            self._stage(f"lora-{t}", self._lora_spec(t), ("base",), train_lora, resumes=True)
            for t in self.tasks
        ]
        lora_names = tuple(s.name for s in loras)
        adapters = dict(zip(self.tasks, (s.folder for s in loras), strict=True))
        gate = self._stage(
            "gate", self._gate_spec(adapters, "gate"), ("base", *lora_names), train, resumes=True
        )
        labelled = self._stage(
            "gate-composite",
            self._labelled_spec(adapters, gate.folder, os.path.join(composite.out, "data")),
            ("composite", gate.name),
            train,
            resumes=True,
        )
        peft = self._eval_spec("peft", ("base", "adapter", "merged"), adapters=adapters)
        meteora = self._eval_spec("meteora", ("meteora",), gates=gate.folder)
        meteora_labelled = self._eval_spec("meteora-composite", ("meteora",), gates=labelled.folder)
        return [
            Stage("base", self.setup, dataclasses.asdict(s.base), (), self._base),
            self._stage("composite", composite, ("base",), build_composites),
            *loras,
            gate,
            labelled,
            self._stage("eval-peft", peft, ("composite", *lora_names), _evaluate_without_gates),
            self._stage("eval-meteora", meteora, ("composite", gate.name), evaluate),
            self._stage("eval-meteora-composite", meteora_labelled, ("composite", labelled.name), evaluate),
        ]

    def _stage(
        self, name: str, spec, needs: tuple[str, ...], run: Callable, *, resumes: bool = False
    ) -> Stage:
        settings = self._portable(dataclasses.asdict(spec))
        return Stage(name, spec.out, settings, needs, lambda: run(spec), resumes)

    def _portable(self, value):
        """`value` without its progress flag and with the paths inside OUT relative to OUT: a key
        says what a stage does, not where the demo folder is or whether it shows a bar."""
        if isinstance(value, dict):
            return {k: self._portable(v) for k, v in value.items() if k != "progress"}
        if isinstance(value, list | tuple):
            return [self._portable(v) for v in value]
        if isinstance(value, str) and (value == self.out or value.startswith(self.out + os.sep)):
            return os.path.relpath(value, self.out)
        return value

    def _base(self) -> None:
        build_demo_base(self.setup, self.settings.base, progress=self.progress)

    def _data(self, seed: int = DataConfig.seed) -> DataConfig:
        s = self.settings
        return DataConfig(seq_len=s.seq_len, batch_size=s.batch_size, lm_loss="response", seed=seed)

    def _lora_spec(self, task: str) -> LoRASpec:
        s = self.settings
        train_config = lora_train_config(
            s.lora_steps, lr=s.lora_lr, warmup_steps=min(s.lora_warmup_steps, s.lora_steps - 1),
            clip_norm=s.clip_norm, save_every=min(s.save_every, s.lora_steps),
            log_every=max(1, s.lora_steps // 50),
        )  # fmt: skip
        return LoRASpec(
            base=self.base,
            data_dir=os.path.join(self.data, task),
            out=self.path("lora", task),
            train=train_config,
            data=self._data(),
            lora=LoRASettings(rank=s.lora_rank, alpha=s.lora_alpha, targets=s.lora_targets),
            options=RunOptions(progress=self.progress),
        )

    def _gate_spec(self, adapters: dict[str, str], folder: str) -> RunSpec:
        s = self.settings
        config = TrainConfig(
            steps=s.gate_steps, lr=s.gate_lr, clip_norm=s.clip_norm, gate_loss_weight=s.gate_loss_weight,
            train_adapters=True, top_k=s.top_k, save_every=min(s.save_every, s.gate_steps),
            log_every=max(1, s.gate_steps // 100), seed=s.gate_seed,
            routing_noise=s.gate_routing_noise,
        )  # fmt: skip
        return RunSpec(
            base=self.base,
            adapters=adapters,
            data_dir=self.data,
            out=self.path(folder),
            train=config,
            data=self._data(s.gate_seed),
            options=RunOptions(progress=self.progress),
        )

    def _labelled_spec(self, adapters: dict[str, str], init_from: str, data: str) -> RunSpec:
        s = self.settings
        config = TrainConfig(
            steps=s.labelled_steps, lr=s.labelled_lr, clip_norm=s.clip_norm,
            gate_loss_weight=s.gate_loss_weight, train_adapters=False, top_k=s.top_k,
            save_every=min(s.save_every, s.labelled_steps), log_every=max(1, s.labelled_steps // 100),
            seed=s.gate_seed,
        )  # fmt: skip
        return RunSpec(
            base=self.base,
            adapters=adapters,
            data_dir=data,
            out=self.path("gate-composite"),
            train=config,
            data=self._data(s.gate_seed),
            init_from=init_from,
            options=RunOptions(progress=self.progress),
        )

    def _eval_spec(self, folder: str, modes: tuple[str, ...], **model) -> EvalSpec:
        s = self.settings
        return EvalSpec(
            base=self.base,
            tasks_dir=self.data,
            out=self.path("eval", folder),
            composite=self.path("composite", COMPOSITE_FILE),
            metrics=self.path("composite", METRICS_FILE),
            settings=EvalSettings(
                modes=modes,
                batch_size=s.eval_batch_size,
                max_new_tokens=s.max_new_tokens,
                routing_temperature=s.routing_temperature,
                composite_routing_temperature=s.composite_routing_temperature,
                limit=s.eval_limit,
            ),  # fmt: skip
            force=True,  # an eval stage that runs replaces its folder
            progress=self.progress,
            **model,
        )

    # ------------------------------------------------------------------ records

    def _record_path(self, name: str) -> str:
        return self.path(STAGES_DIR, f"{name}.json")

    def record(self, name: str) -> dict | None:
        """The record of stage `name` ({"key", "done"[, "seconds"]}), or None."""
        try:
            with open(self._record_path(name), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self, name: str, record: dict) -> None:
        os.makedirs(self.path(STAGES_DIR), exist_ok=True)
        write_text_atomic(self._record_path(name), json.dumps(record, indent=2))

    def run(self) -> dict[str, dict]:
        """Runs (or skips) every stage in order; returns {stage: {"seconds", "cached"}}."""
        keys: dict[str, str] = {}
        done: dict[str, dict] = {}
        stages = self.stages
        for number, stage in enumerate(stages, 1):
            key = keys[stage.name] = _key(stage.settings, [keys[n] for n in stage.needs])
            record = self.record(stage.name)
            header = f"[{number}/{len(stages)}] {stage.name}"
            rebuilt = [n for n in stage.needs if not done[n]["cached"]]
            same = record is not None and record.get("key") == key and not rebuilt
            if same and record.get("done") and is_real(record.get("seconds")) and os.path.isdir(stage.folder):
                done[stage.name] = {"seconds": record["seconds"], "cached": True}
                print(f"{header}: cached ({record['seconds']:.0f} s)", file=sys.stderr)
                continue
            if record is None:
                print(header, file=sys.stderr)
            elif same:
                print(
                    f"{header}: {'resuming' if stage.resumes else 'unfinished, starting over'}",
                    file=sys.stderr,
                )
            else:
                why = f"{', '.join(rebuilt)} ran again" if rebuilt else "settings changed"
                print(f"{header}: {why}, rebuilding", file=sys.stderr)
            if not (same and stage.resumes):
                shutil.rmtree(stage.folder, ignore_errors=True)
            self._write_record(stage.name, {"key": key, "done": False})
            start = time.perf_counter()
            stage.run()
            seconds = time.perf_counter() - start
            self._write_record(stage.name, {"key": key, "done": True, "seconds": seconds})
            done[stage.name] = {"seconds": seconds, "cached": False}
        return done


def _evaluate_without_gates(spec: EvalSpec) -> None:
    """`evaluate` for modes that never route (base, adapter, merged): the model is still fused
    with seeded gates, whose "untrained gates" warning would only mislead here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no gates given", category=UserWarning)
        evaluate(spec)


def is_demo_folder(out: str) -> bool:
    """Whether `out` holds a demo's stage records (its base stage's at least)."""
    path = os.path.join(out, STAGES_DIR, "base.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "key" in record


def prepare(out: str, *, force: bool) -> None:
    """Refuses an --out that is neither new, empty nor a demo folder (unless `force`, which
    starts over); `check_output_path`'s refusals always apply."""
    check_output_path(out)
    out = os.path.abspath(out)
    taken = os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out))
    if taken and not force and not is_demo_folder(out):
        raise OutputExistsError(
            f"--out {out} exists and is not a demo folder (no {STAGES_DIR}/base.json): pass --force to "
            "replace it"
        )
    if taken and force:
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        else:
            os.remove(out)


def run_demo(
    out: str, settings: DemoSettings = DemoSettings(), *, force: bool = False, progress: bool = True
) -> dict:
    """Runs the demo into OUT (see the module docstring); returns the report's results.json."""
    demo = DemoRun(out, settings, progress=progress)  # bad settings fail here, before OUT is touched
    prepare(out, force=force)
    stages = demo.run()
    rows = {row: (demo.stage_folder(stage), mode) for row, (stage, mode) in ROWS.items()}
    curves = {name: demo.path(name, "curves.png") for name in ("gate", "gate-composite")}
    curves |= {f"lora-{t}": demo.path("lora", t, "training", "curves.png") for t in demo.tasks}
    return write_report(
        demo.path("report"),
        rows,
        routing={
            "meteora": demo.stage_folder("gate"),
            "meteora-labelled": demo.stage_folder("gate-composite"),
        },
        pictures={"routing.png": rows["meteora"][0], "routing-labelled.png": rows["meteora-labelled"][0]},
        curves=curves,
        stages=stages,
    )
