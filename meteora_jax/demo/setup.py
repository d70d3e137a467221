"""The demo's starting point, built from nothing: task folders, a character-level tokenizer and a
small LLaMA pre-trained on the copy task, so it follows the prompt format but can do no task.

Every adapter `train-lora` then makes on this base starts from 0% exact match (the base cannot
do the tasks) with the answer format already in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from meteora_jax.data.prompts import format_prompt, train_tiny_tokenizer
from meteora_jax.data.tasks import Sample
from meteora_jax.demo.pretrain import PretrainSettings, pretrain
from meteora_jax.demo.tasks import (
    TASKS,
    composite_copy_samples,
    labelled_composite_samples,
    task_samples,
    tiny_config,
)
from meteora_jax.errors import ConfigError
from meteora_jax.io.files import write_text_atomic
from meteora_jax.io.hf import save_llama
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.sharding import make_mesh

# Tried and left out, their adapters missing 90% exact match on this base at the demo's budget:
# count (31%), add (8%), and cipher (100% on one base, 8-17% on two others: it is seed-sensitive).
DEMO_TASKS = ("reverse", "upper", "sort", "shift", "rotate", "double")


@dataclasses.dataclass(frozen=True)
class DemoBaseSettings:
    """Sizes of the demo's data and base. The vocabulary is small enough that the tokenizer
    stays (almost) character-level, which string tasks need."""

    tasks: tuple[str, ...] = DEMO_TASKS
    train: int = 512
    test: int = 64
    copies: int = 6000
    composites: int = 0
    layers: int = 4
    hidden: int = 128
    vocab_size: int = 70
    max_positions: int = 512
    pretrain: PretrainSettings = PretrainSettings(steps=400, batch_size=32, seq_len=48, lr=3e-3)
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


def build_demo_base(
    root: str, settings: DemoBaseSettings = DemoBaseSettings(), *, progress: bool = True
) -> DemoBase:
    """Writes ROOT/data/<task>/{train,test}.jsonl and ROOT/base, pre-trained on copy samples."""
    rng = np.random.default_rng(settings.seed)
    data = os.path.join(root, "data")
    texts = []
    for task in settings.tasks:
        os.makedirs(os.path.join(data, task), exist_ok=True)
        for split, count in (("train", settings.train), ("test", settings.test)):
            samples = task_samples(task, count, rng)
            lines = "".join(json.dumps(s) + "\n" for s in samples)
            write_text_atomic(os.path.join(data, task, f"{split}.jsonl"), lines)
            texts += [format_prompt(s["prompt"]) + s["response"] for s in samples]
    copies = task_samples("copy", settings.copies, rng)
    composites = composite_copy_samples(settings.composites, rng)
    texts += [format_prompt(s["prompt"]) + s["response"] for s in copies + composites]
    tokenizer = train_tiny_tokenizer(texts, os.path.join(root, "tokenizer"), vocab_size=settings.vocab_size)
    config = tiny_config(
        len(tokenizer), layers=settings.layers, hidden=settings.hidden, max_positions=settings.max_positions
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(settings.seed))
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.devices())
    samples = {
        name: tuple(Sample(0, prompt=s["prompt"], response=s["response"]) for s in group)
        for name, group in (("copy", copies), ("composite-copy", composites))
        if group
    }
    losses = pretrain(model, tokenizer, samples, settings.pretrain, mesh, progress=progress)
    base = os.path.join(root, "base")
    save_llama(model, base)
    tokenizer.save_pretrained(base)
    return DemoBase(base=base, data=data, pretrain_losses=losses)


def write_labelled_composite_data(data: str, out: str, *, samples: int, n: int = 3, seed: int = 0) -> str:
    """OUT/<task>/: each task folder of DATA (train and test as they are) with `samples`
    labelled composite-n training prompts (`labelled_composite_samples`) dealt round-robin into
    the train splits: the data of the composite-trained gate variant. Returns OUT."""
    tasks = sorted(e for e in os.listdir(data) if os.path.isfile(os.path.join(data, e, "train.jsonl")))
    if len(tasks) < n:
        raise ConfigError(f"{data}: {len(tasks)} task folders, composite-{n} prompts need {n}")
    extra = labelled_composite_samples(tasks, samples, np.random.default_rng(seed), n=n)
    for i, task in enumerate(tasks):
        os.makedirs(os.path.join(out, task), exist_ok=True)
        for split in ("train", "test"):
            with open(os.path.join(data, task, f"{split}.jsonl"), encoding="utf-8") as f:
                text = f.read()
            if split == "train":
                text += "".join(json.dumps(s) + "\n" for s in extra[i :: len(tasks)])
            write_text_atomic(os.path.join(out, task, f"{split}.jsonl"), text)
    return out
