"""Synthetic tasks and a tiny base + adapters on disk: what training needs, built offline.

String and number tasks whose prompts share the chat template and say what to do in a keyword,
e.g. `[INST] reverse: abc [/INST]` -> `cba`, `add: 12 30` -> `42`, `count: a in abca` -> `2`
(`TASKS`), plus `copy`, the demo base's pre-training task. The tests' setup (`TINY_TASKS`) is a
tiny LLaMA with a BPE tokenizer trained on three of them and one random PEFT adapter per task,
enough for `train-gate` to learn routing in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from meteora_jax.config import PROJECTIONS, LlamaConfig, projection_shape
from meteora_jax.data.composite import answer_text, composite_text, labelled_segments
from meteora_jax.data.prompts import format_prompt, train_tiny_tokenizer
from meteora_jax.data.tasks import Sample
from meteora_jax.io.files import write_text_atomic
from meteora_jax.io.hf import save_llama
from meteora_jax.io.peft import LoRAAdapter, LoRAModule
from meteora_jax.io.peft_write import write_adapter
from meteora_jax.modeling.llama import INIT_STD, LlamaForCausalLM

LETTERS = "abcdefghij"


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), int(rng.integers(3, 7))))


def _count_input(rng: np.random.Generator) -> str:
    letter = rng.choice(list(LETTERS[:3]))
    word = "".join(rng.choice(list(LETTERS[:4]), int(rng.integers(4, 9))))
    return f"{letter} in {word}"


def _count(text: str) -> str:
    letter, _, word = text.partition(" in ")
    return str(word.count(letter))


def _add_input(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(0, 50))} {int(rng.integers(0, 50))}"


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)


CIPHER = dict(zip(LETTERS, "fjbhaeigcd", strict=True))  # a fixed letter permutation with no fixed point


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task: a random input, and the answer the prompt `"{name}: {input}"` asks for."""

    make_input: Callable[[np.random.Generator], str]
    answer: Callable[[str], str]


TASKS = {
    "reverse": Task(_word, lambda word: word[::-1]),
    "upper": Task(_word, lambda word: word.upper()),
    "double": Task(_word, lambda word: word + word),
    "sort": Task(_word, lambda word: "".join(sorted(word))),
    "count": Task(_count_input, _count),
    "add": Task(_add_input, lambda text: str(sum(int(x) for x in text.split()))),
    "shift": Task(_word, _shift),
    "rotate": Task(_word, lambda word: word[1:] + word[0]),
    "cipher": Task(_word, lambda word: "".join(CIPHER[c] for c in word)),
}
TINY_TASKS = ("reverse", "upper", "double")  # the tests' three-task setup
TINY_LAYERS, TINY_HIDDEN, TINY_MAX_POSITIONS = 2, 64, 256  # its model
TINY_TRAIN, TINY_TEST = 64, 16  # its samples per task and split
COPY_CHARACTERS = LETTERS + LETTERS.upper()  # every character a task reads or writes
QUESTION_COUNTS = (2, 3, 4, 5)  # questions of a numbered sample


def _any_text(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(COPY_CHARACTERS), int(rng.integers(2, 9))))


# The demo base's pre-training tasks: the answer formats over every character the tasks use, under two
# keywords whose answers differ at every character, so the base must read a question's keyword to
# answer it. Neither is a task's skill.
PRETRAIN_TASKS = {"copy": Task(_any_text, lambda text: text), "lower": Task(_any_text, str.lower)}


def _question(task: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (prompt, answer) of `task` (`TASKS` or `PRETRAIN_TASKS`). An input a task would leave
    as it is (a palindrome to reverse, a sorted word to sort) is drawn again: copying never
    scores."""
    spec = PRETRAIN_TASKS.get(task) or TASKS[task]
    while True:
        text = spec.make_input(rng)
        answer = spec.answer(text)
        if task in PRETRAIN_TASKS or answer != text:
            return f"{task}: {text}", answer


def task_samples(task: str, count: int, rng: np.random.Generator) -> list[dict]:
    """`count` {"prompt", "response"} samples of one task (`TASKS` or `PRETRAIN_TASKS`)."""
    return [dict(zip(("prompt", "response"), _question(task, rng), strict=True)) for _ in range(count)]


def numbered_sample(pairs: Sequence[tuple[str, str]]) -> dict:
    """Several questions as one sample in the numbered composite layout, answered as numbered lines."""
    return {
        "prompt": composite_text([], [q for q, _ in pairs], layout="numbered"),
        "response": answer_text([a for _, a in pairs]),
    }


def numbered_task_samples(
    task: str, count: int, rng: np.random.Generator, counts: Sequence[int] = QUESTION_COUNTS
) -> list[dict]:
    """`count` numbered samples of 2-5 questions of one task: an adapter learns its task in the
    composite answer format from its own task alone."""
    return [
        numbered_sample([_question(task, rng) for _ in range(int(rng.choice(counts)))]) for _ in range(count)
    ]


def pretraining_keywords(tasks: Sequence[str]) -> tuple[str, ...]:
    """The keyword of each pre-training label: `PRETRAIN_TASKS`' (answered), then the tasks'."""
    return (*PRETRAIN_TASKS, *tasks)


def pretraining_samples(
    count: int,
    rng: np.random.Generator,
    *,
    tasks: Sequence[str] = (),
    task_share: float = 0.0,
    numbered: float = 0.5,
    counts: Sequence[int] = QUESTION_COUNTS,
) -> list[Sample]:
    """The base's pre-training: `count` samples, a share `numbered` of them numbered samples of 2-5
    questions (each its own keyword), the others one question. A question is one of `tasks`' with
    probability `task_share`, else a `PRETRAIN_TASKS` one. Each token is labelled with its
    question's index in `pretraining_keywords(tasks)` (numbered samples as segments)."""
    keywords = pretraining_keywords(tasks)
    out = []
    for _ in range(count):
        k = int(rng.choice(counts)) if rng.random() < numbered else 1
        names = [
            str(rng.choice(list(tasks)))
            if tasks and rng.random() < task_share
            else str(rng.choice(list(PRETRAIN_TASKS)))
            for _ in range(k)
        ]
        pairs = [_question(name, rng) for name in names]
        if k == 1:
            out.append(Sample(keywords.index(names[0]), prompt=pairs[0][0], response=pairs[0][1]))
            continue
        segments = labelled_segments(
            [], [q for q, _ in pairs], [a for _, a in pairs], names, layout="numbered"
        )
        out.append(
            Sample(
                keywords.index(names[0]),
                segments=tuple((keywords.index(g["task"]), g["text"]) for g in segments),
            )
        )
    return out


def sample_text(sample: Sample) -> str:
    """The whole text of a sample as training sees it (the prompt formatted)."""
    if sample.segments is not None:
        return "".join(text for _, text in sample.segments)
    return format_prompt(sample.prompt) + sample.response


def labelled_composite_samples(
    tasks: Sequence[str], count: int, rng: np.random.Generator, counts: Sequence[int] = (3,)
) -> list[dict]:
    """`count` answered numbered composite prompts over n (drawn from `counts`) of `tasks`, in a
    random order, as segments samples whose tokens carry their own sub-task's label
    (`labelled_segments`): training material for gates that switch inside a prompt."""
    out = []
    for _ in range(count):
        n = int(rng.choice(counts))
        names = [str(t) for t in rng.permutation(list(tasks))[:n]]
        pairs = [_question(t, rng) for t in names]
        segments = labelled_segments(
            [], [q for q, _ in pairs], [a for _, a in pairs], names, layout="numbered"
        )
        out.append({"segments": segments})
    return out


def write_tasks(
    data_dir: str, *, train: int = TINY_TRAIN, test: int = TINY_TEST, seed: int = 0, tasks=TINY_TASKS
) -> dict:
    """Writes DATA/<task>/{train,test}.jsonl; returns {task: [train samples]} (for tokenizers)."""
    rng = np.random.default_rng(seed)
    written = {}
    for task in tasks:
        folder = os.path.join(data_dir, task)
        os.makedirs(folder, exist_ok=True)
        for split, count in (("train", train), ("test", test)):
            samples = task_samples(task, count, rng)
            text = "".join(json.dumps(s) + "\n" for s in samples)
            write_text_atomic(os.path.join(folder, f"{split}.jsonl"), text)
            if split == "train":
                written[task] = samples
    return written


@dataclasses.dataclass(frozen=True)
class TinySetup:
    """Folders of a tiny training setup."""

    base: str
    adapters: dict[str, str]  # task name -> PEFT folder
    data: str


def tiny_config(
    vocab_size: int,
    *,
    layers: int = TINY_LAYERS,
    hidden: int = TINY_HIDDEN,
    max_positions: int = TINY_MAX_POSITIONS,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
    )


def random_adapter(name: str, config: LlamaConfig, rank: int, seed: int, targets=PROJECTIONS) -> LoRAAdapter:
    """A PEFT-style adapter with random A and B on every layer of `targets`."""
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(config.num_hidden_layers):
        for projection in targets:
            d_in, d_out = projection_shape(config, projection)
            a = rng.normal(0, 0.2, (rank, d_in)).astype(np.float32)
            b = rng.normal(0, 0.2, (d_out, rank)).astype(np.float32)
            modules[(layer, projection)] = LoRAModule.from_alpha(a, b, alpha=2.0 * rank)
    return LoRAAdapter(name, modules)


def write_tiny_setup(
    root: str,
    *,
    seed: int = 0,
    layers: int = TINY_LAYERS,
    hidden: int = TINY_HIDDEN,
    rank: int = 4,
    train: int = TINY_TRAIN,
    test: int = TINY_TEST,
    targets=PROJECTIONS,
    init_std: float = INIT_STD,
) -> TinySetup:
    """A tiny base (with tokenizer), one random adapter per task and the task folders under `root`.

    init_std: the std of the base's random weight matrices. At transformers' 0.02 a 64-wide
    model cannot make any next-token distribution peaked (its logits stay near 0); ~0.1 can.
    """
    data = os.path.join(root, "data")
    samples = write_tasks(data, train=train, test=test, seed=seed)
    texts = [f"[INST] {s['prompt']} [/INST] {s['response']}" for task in samples.values() for s in task]
    base = os.path.join(root, "base")
    config_probe = train_tiny_tokenizer(texts, os.path.join(root, "tokenizer"), vocab_size=160)
    config = tiny_config(len(config_probe), layers=layers, hidden=hidden)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    weights = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: w * (init_std / INIT_STD) if w.ndim > 1 else w, weights))
    save_llama(model, base)
    config_probe.save_pretrained(base)
    adapters = {}
    for i, task in enumerate(samples):
        folder = os.path.join(root, "adapters", task)
        write_adapter(random_adapter(task, config, rank, seed + 1 + i, targets), folder, config=config)
        adapters[task] = folder
    return TinySetup(base=base, adapters=adapters, data=data)
