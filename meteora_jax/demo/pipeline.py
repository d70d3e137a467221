"""`meteora-jax demo`: MeteoRA's experiment end to end on the embedded tasks, cached by stage.

Stages, each in its own folder under OUT:
  setup/          the base (a tiny LLaMA pre-trained on copy samples) and the task folders;
  lora/<task>/    one PEFT adapter per task (`train-lora`);
  gate/           the gates, trained with the adapter stacks on single-task samples (`train-gate`);
  eval/peft/      base, each task's own adapter and the averaged adapters (the PEFT adapters);
  eval/meteora/   the fused model routed by its gates;
  report/         report.md, results.json, the routing view of a composite prompt, the curves.

A stage records its key (a hash of its settings and of the keys of the stages it reads) in
OUT/stages/<stage>.json when it starts and marks it done when it ends. A rerun skips a done stage
whose key still matches, resumes a started one (the training runs resume from their
checkpoints), and rebuilds a stage whose key changed, and with it everything downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

from meteora_jax.data.pipeline import DataConfig
from meteora_jax.demo.pretrain import PretrainSettings
from meteora_jax.demo.setup import DemoBaseSettings, build_demo_base
from meteora_jax.errors import ConfigError, OutputExistsError
from meteora_jax.inputs import is_int
from meteora_jax.io.files import check_output_path, write_text_atomic

STAGES_DIR = "stages"
MODES_PEFT = ("base", "adapter", "merged")
COMPOSITE_N = 3


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes and recipe (`fast()`: a tiny version for tests and a quick look).

    Adapters: `train-lora` at `lora_lr` for `lora_steps`. Gates: `train-gate` at `gate_lr` for
    `gate_steps`, training the adapter stacks with them (as the reference did) on the LM loss of
    the responses plus the gate term. Evaluation: greedy, `eval_limit` test samples per task
    and `composite_samples` composite-3 prompts, routed at `routing_temperature` (1: the gates as
    trained; the reference's 15 for composite-3 flattens the top-2 weights of these gates)."""

    base: DemoBaseSettings = DemoBaseSettings()
    batch_size: int = 16
    seq_len: int = 64
    lora_steps: int = 500
    lora_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    gate_steps: int = 900
    gate_lr: float = 1e-3
    top_k: int = 2
    eval_limit: int = 64
    composite_samples: int = 32
    max_new_tokens: int = 40
    eval_batch_size: int = 16
    routing_temperature: float = 1.0

    def __post_init__(self):
        ints = ("batch_size", "seq_len", "lora_steps", "lora_rank", "gate_steps", "top_k", "eval_limit")
        ints += ("composite_samples", "max_new_tokens", "eval_batch_size")
        bad = [
            f"{n}={getattr(self, n)!r}" for n in ints if not is_int(getattr(self, n)) or getattr(self, n) < 1
        ]
        if len(self.base.tasks) < COMPOSITE_N:
            bad.append(f"tasks={list(self.base.tasks)} (composite-{COMPOSITE_N} prompts need {COMPOSITE_N})")
        if self.composite_samples > self.base.test:
            bad.append(f"composite_samples={self.composite_samples} above the {self.base.test} test samples")
        if bad:
            raise ConfigError("demo settings: " + ", ".join(bad) + " (each must be an integer >= 1)")

    @classmethod
    def fast(cls) -> DemoSettings:
        base = DemoBaseSettings(
            tasks=("reverse", "upper", "shift"), train=32, test=8, copies=64, layers=2, hidden=32,
            pretrain=PretrainSettings(steps=8, batch_size=8, seq_len=48, lr=3e-3),
        )  # fmt: skip
        return cls(
            base=base, batch_size=8, seq_len=48, lora_steps=4, gate_steps=4, eval_limit=4,
            composite_samples=2, max_new_tokens=8, eval_batch_size=4,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Stage:
    """One cached step: its name, the folder it writes, what it depends on, and how to run it."""

    name: str
    folder: str
    settings: dict
    needs: tuple[str, ...]
    run: Callable[[], None]


def _key(settings: dict, upstream: Sequence[str]) -> str:
    text = json.dumps({"settings": settings, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DemoRun:
    """The stages of one demo folder and their records."""

    def __init__(self, out: str, settings: DemoSettings, *, progress: bool = True):
        self.out = os.path.abspath(out)
        self.settings = settings
        self.progress = progress
        self.setup = os.path.join(self.out, "setup")
        self.base = os.path.join(self.setup, "base")
        self.data = os.path.join(self.setup, "data")
        self.tasks = tuple(settings.base.tasks)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stages(self) -> list[Stage]:
        s = self.settings
        train = {"batch_size": s.batch_size, "seq_len": s.seq_len}
        stages = [Stage("base", self.setup, dataclasses.asdict(s.base), (), self._base)]
        lora = {**train, "steps": s.lora_steps, "lr": s.lora_lr, "rank": s.lora_rank, "alpha": s.lora_alpha}
        for task in self.tasks:
            stages.append(Stage(f"lora-{task}", self.path("lora", task), lora, ("base",), self._lora(task)))
        gate = {**train, "steps": s.gate_steps, "lr": s.gate_lr, "top_k": s.top_k}
        loras = tuple(f"lora-{t}" for t in self.tasks)
        stages.append(Stage("gate", self.path("gate"), gate, ("base", *loras), self._gate))
        evals = {
            k: getattr(s, k)
            for k in (
                "eval_limit",
                "composite_samples",
                "max_new_tokens",
                "eval_batch_size",
                "routing_temperature",
            )
        }
        stages.append(Stage("eval-peft", self.path("eval", "peft"), evals, ("base", *loras), self._eval_peft))
        stages.append(
            Stage("eval-meteora", self.path("eval", "meteora"), evals, ("base", "gate"), self._eval_meteora)
        )
        return stages

    # ------------------------------------------------------------------ stage bodies

    def _base(self) -> None:
        build_demo_base(self.setup, self.settings.base, progress=self.progress)

    def _data(self) -> DataConfig:
        return DataConfig(
            seq_len=self.settings.seq_len, batch_size=self.settings.batch_size, lm_loss="response"
        )

    def _lora(self, task: str) -> Callable[[], None]:
        def run() -> None:
            from meteora_jax.training.train_lora import LoRASettings, LoRASpec, lora_train_config, train_lora

            s = self.settings
            train = lora_train_config(s.lora_steps, lr=s.lora_lr, warmup_steps=min(10, s.lora_steps - 1))
            train = dataclasses.replace(train, save_every=s.lora_steps, log_every=max(1, s.lora_steps // 50))
            spec = LoRASpec(
                base=self.base,
                data_dir=os.path.join(self.data, task),
                out=self.path("lora", task),
                train=train,
                data=self._data(),
                lora=LoRASettings(rank=s.lora_rank, alpha=s.lora_alpha),
                progress=self.progress,
            )
            train_lora(spec)

        return run

    def _adapters(self) -> dict[str, str]:
        return {task: self.path("lora", task) for task in self.tasks}

    def _gate(self) -> None:
        from meteora_jax.training.config import TrainConfig
        from meteora_jax.training.train_gate import RunSpec, train

        s = self.settings
        config = TrainConfig(
            steps=s.gate_steps, lr=s.gate_lr, clip_norm=1.0, train_adapters=True, top_k=s.top_k,
            save_every=s.gate_steps, log_every=max(1, s.gate_steps // 100),
        )  # fmt: skip
        spec = RunSpec(
            base=self.base,
            adapters=self._adapters(),
            data_dir=self.data,
            out=self.path("gate"),
            train=config,
            data=self._data(),
            progress=self.progress,
        )
        train(spec)

    def _eval(self, out: str, modes: tuple[str, ...], **model) -> None:
        from meteora_jax.evaluation.evaluate import EvalSpec, evaluate

        s = self.settings
        spec = EvalSpec(
            base=self.base,
            tasks_dir=self.data,
            out=out,
            modes=modes,
            composite_n=COMPOSITE_N,
            composite_samples=s.composite_samples,
            batch_size=s.eval_batch_size,
            max_new_tokens=s.max_new_tokens,
            routing_temperature=s.routing_temperature,
            limit=s.eval_limit,
            force=True,
            progress=self.progress,
            **model,
        )
        evaluate(spec)

    def _eval_peft(self) -> None:
        self._eval(self.path("eval", "peft"), MODES_PEFT, adapters=self._adapters())

    def _eval_meteora(self) -> None:
        self._eval(self.path("eval", "meteora"), ("meteora",), gates=self.path("gate"))

    # ------------------------------------------------------------------ records

    def _record_path(self, name: str) -> str:
        return self.path(STAGES_DIR, f"{name}.json")

    def record(self, name: str) -> dict | None:
        try:
            with open(self._record_path(name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _write_record(self, name: str, record: dict) -> None:
        os.makedirs(self.path(STAGES_DIR), exist_ok=True)
        write_text_atomic(self._record_path(name), json.dumps(record, indent=2))

    def run(self) -> dict[str, dict]:
        """Runs (or skips) every stage in order; returns {stage: {"seconds", "cached"}}."""
        keys: dict[str, str] = {}
        done: dict[str, dict] = {}
        stages = self.stages()
        for number, stage in enumerate(stages, 1):
            key = keys[stage.name] = _key(stage.settings, [keys[n] for n in stage.needs])
            record = self.record(stage.name)
            if record and record.get("key") == key and record.get("done") and os.path.isdir(stage.folder):
                done[stage.name] = {"seconds": record["seconds"], "cached": True}
                print(
                    f"[{number}/{len(stages)}] {stage.name}: cached ({record['seconds']:.0f} s)",
                    file=sys.stderr,
                )
                continue
            if not (record and record.get("key") == key):  # new settings: start over
                shutil.rmtree(stage.folder, ignore_errors=True)
            print(f"[{number}/{len(stages)}] {stage.name}", file=sys.stderr)
            self._write_record(stage.name, {"key": key, "done": False})
            start = time.perf_counter()
            stage.run()
            seconds = time.perf_counter() - start
            self._write_record(stage.name, {"key": key, "done": True, "seconds": seconds})
            done[stage.name] = {"seconds": seconds, "cached": False}
        return done


def is_demo_folder(out: str) -> bool:
    return os.path.isdir(os.path.join(out, STAGES_DIR))


def prepare(out: str, *, force: bool) -> None:
    """Refuses an --out that is neither new, empty nor a demo folder (unless `force`, which
    starts over); `check_output_path`'s refusals always apply."""
    check_output_path(out)
    out = os.path.abspath(out)
    taken = os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out))
    if taken and not force and not is_demo_folder(out):
        raise OutputExistsError(
            f"--out {out} exists and is not a demo folder (no {STAGES_DIR}/): pass --force to replace it"
        )
    if taken and force:
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        else:
            os.remove(out)


def run_demo(
    out: str, settings: DemoSettings = DemoSettings(), *, force: bool = False, progress: bool = True
) -> dict:
    """Runs the demo into OUT (see the module docstring); returns the report's results."""
    from meteora_jax.demo.report import write_report

    prepare(out, force=force)
    demo = DemoRun(out, settings, progress=progress)
    stages = demo.run()
    curves = {"gate": demo.path("gate", "curves.png")}
    curves |= {f"lora-{t}": demo.path("lora", t, "training", "curves.png") for t in demo.tasks}
    return write_report(
        demo.path("report"),
        demo.path("eval", "peft"),
        demo.path("eval", "meteora"),
        curves,
        stages,
        COMPOSITE_N,
    )
