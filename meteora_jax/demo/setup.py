"""The demo's starting point, built from nothing: task folders, a character-level tokenizer and a
small LLaMA pre-trained on copying and on naming each answer's question (`demo.pretrain`), so it
follows the prompt formats and knows which question it answers, but can do no task.

Every adapter `train-lora` then makes on this base starts from 0% exact match (the base cannot
do the tasks) with both answer formats already in place: one question, and numbered questions
answered as numbered lines (the numbered composite layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from meteora_jax.data.composite import INSTRUCTION, answer_text, composite_text
from meteora_jax.data.prompts import PROMPT_TEMPLATE, check_round_trip, format_prompt, train_tiny_tokenizer
from meteora_jax.demo.pretrain import PretrainSettings, Readout, pretrain
from meteora_jax.demo.synthetic import (
    PRETRAIN_TASKS,
    TASKS,
    TINY_MAX_POSITIONS,
    labelled_composite_samples,
    numbered_task_samples,
    pretraining_keywords,
    pretraining_samples,
    sample_text,
    task_samples,
    tiny_config,
)
from meteora_jax.errors import ConfigError
from meteora_jax.io.files import write_text_atomic
from meteora_jax.io.hf import save_llama
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.sharding import DEFAULT_MESH, make_mesh

# Tried and left out (docs/demo_design.md): sort, 94% alone but right in 12% of composite-5 lines
# (56% under the oracle routing: other lines' letters leak into its answers); reverse (89% alone),
# count (31%) and add (8%), their adapters below 90% at the demo's budget.
DEMO_TASKS = ("upper", "cipher", "shift", "rotate", "double")


@dataclasses.dataclass(frozen=True)
class DemoBaseSettings:
    """Sizes of the demo's data and base: per task `train` one-question and `numbered` numbered
    (2-5 questions of that task) training samples and `test` one-question test samples;
    `pretrain_samples` pre-training samples, a share `pretrain_numbered` of them numbered, a share
    `pretrain_task_share` of their questions the tasks' (read, never answered, by the base)."""

    tasks: tuple[str, ...] = DEMO_TASKS
    train: int = 2048
    numbered: int = 1024
    test: int = 64
    pretrain_samples: int = 16000
    pretrain_numbered: float = 0.5
    pretrain_task_share: float = 0.3
    layers: int = 4
    hidden: int = 128
    max_positions: int = TINY_MAX_POSITIONS
    pretrain: PretrainSettings = PretrainSettings(
        steps=550, batch_size=28, seq_len=144, lr=3e-3, readout_start=250, readout_weight=1.0
    )
    seed: int = 0

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"demo tasks must be some of {', '.join(TASKS)}, got {list(self.tasks)}")


@dataclasses.dataclass(frozen=True)
class DemoBase:
    """Folders of a built demo base: `base` (HF model + tokenizer) and `data` (DATA/<task>/)."""

    base: str
    data: str
    pretrain_losses: Sequence[float]


def _texts(samples: Sequence[dict]) -> list[str]:
    return [format_prompt(s["prompt"]) + s["response"] for s in samples]


def composite_templates(tests: dict[str, list[dict]]) -> list[str]:
    """One formatted, answered composite prompt of every layout over the test samples: the
    template text evaluation will ask the tokenizer to write."""
    names = list(tests)
    questions = [tests[t][0]["prompt"] for t in names]
    answers = answer_text([tests[t][0]["response"] for t in names])
    shots = [[(tests[t][k]["prompt"], tests[t][k]["response"]) for t in names] for k in (1, 2)]
    return [
        format_prompt(composite_text(shots, questions)) + answers,
        format_prompt(composite_text([], questions, layout="numbered")) + answers,
        INSTRUCTION,
    ]


def build_demo_base(
    root: str, settings: DemoBaseSettings = DemoBaseSettings(), *, progress: bool = True
) -> DemoBase:
    """Writes ROOT/data/<task>/{train,test}.jsonl and ROOT/base, pre-trained (`demo.pretrain`).

    The tokenizer is built from every text the demo trains or evaluates on, composite templates
    included, and each is checked to survive the round trip before anything trains.
    """
    rng = np.random.default_rng(settings.seed)
    data = os.path.join(root, "data")
    texts, tests = [], {}
    for task in settings.tasks:
        os.makedirs(os.path.join(data, task), exist_ok=True)
        train = task_samples(task, settings.train, rng) + numbered_task_samples(task, settings.numbered, rng)
        tests[task] = task_samples(task, settings.test, rng)
        for split, samples in (("train", train), ("test", tests[task])):
            lines = "".join(json.dumps(s) + "\n" for s in samples)
            write_text_atomic(os.path.join(data, task, f"{split}.jsonl"), lines)
            texts += _texts(samples)
    keywords = pretraining_keywords(settings.tasks)
    pretraining = pretraining_samples(
        settings.pretrain_samples, rng, tasks=settings.tasks, task_share=settings.pretrain_task_share,
        numbered=settings.pretrain_numbered,
    )  # fmt: skip
    labelled = labelled_composite_samples(settings.tasks, 4, rng, counts=(min(3, len(settings.tasks)),))
    texts += [sample_text(s) for s in pretraining] + composite_templates(tests)
    texts += ["".join(seg["text"] for seg in s["segments"]) for s in labelled]
    words = (*PROMPT_TEMPLATE.replace("{input}", " ").split(), *keywords)  # [INST], [/INST], keywords
    tokenizer = train_tiny_tokenizer(texts, os.path.join(root, "tokenizer"), vocab_size=None, words=words)
    check_round_trip(tokenizer, texts, "demo texts")
    config = tiny_config(
        len(tokenizer), layers=settings.layers, hidden=settings.hidden, max_positions=settings.max_positions
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(settings.seed))
    mesh = make_mesh(**DEFAULT_MESH, devices=jax.devices())
    readout = Readout(
        tuple(tokenizer.convert_tokens_to_ids(k) for k in keywords), answered=len(PRETRAIN_TASKS)
    )
    history = pretrain(
        model, tokenizer, {"pretrain": tuple(pretraining)}, settings.pretrain, mesh, readout=readout,
        progress=progress,
    )  # fmt: skip
    base = os.path.join(root, "base")
    save_llama(model, base)
    tokenizer.save_pretrained(base)
    return DemoBase(base=base, data=data, pretrain_losses=[m["lm_loss"] for m in history])


def write_labelled_composite_data(
    data: str, out: str, *, samples: int, counts: Sequence[int], seed: int = 0
) -> str:
    """OUT/<task>/: each task folder of DATA (train and test as they are) with `samples`
    labelled numbered composite prompts of n in `counts` sub-tasks (`labelled_composite_samples`)
    dealt round-robin into the train splits: the data of the composite-trained gate recipe.
    Returns OUT."""
    tasks = sorted(e for e in os.listdir(data) if os.path.isfile(os.path.join(data, e, "train.jsonl")))
    if len(tasks) < max(counts):
        raise ConfigError(f"{data}: {len(tasks)} task folders, composite-{max(counts)} prompts need more")
    extra = labelled_composite_samples(tasks, samples, np.random.default_rng(seed), counts=counts)
    for i, task in enumerate(tasks):
        os.makedirs(os.path.join(out, task), exist_ok=True)
        for split in ("train", "test"):
            with open(os.path.join(data, task, f"{split}.jsonl"), encoding="utf-8") as f:
                text = f.read()
            if split == "train":
                text += "".join(json.dumps(s) + "\n" for s in extra[i :: len(tasks)])
            write_text_atomic(os.path.join(out, task, f"{split}.jsonl"), text)
    return out
