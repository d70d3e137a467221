"""The evaluation runner: held-out prompts answered by greedy generation in each routing mode,
then scored by the task registry.

Modes (the paper's comparisons, on one loaded model):
- `meteora`: the gates route every token (top-k, the routing temperature);
- `adapter`: every row uses its own task's adapter alone (adapter and task share a name): the
  upper bound MeteoRA should match on single-task prompts. A composite prompt is answered a line
  at a time, each numbered line written with its own sub-task's adapter alone: the oracle
  routing, what perfect per-line switching would score;
- `base`: no adapter at all;
- `merged`: every adapter at weight 1/L on every token, which is the uniform average of the
  adapters (LoRA merging, the baseline): top-L routing at a temperature so high that the
  softmax over the gate logits is exactly uniform in float32.
Composite prompts are answered as numbered lines; each is scored with its own sub-task's metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

from meteora_jax.data.prompts import encode_prompt, format_prompt
from meteora_jax.data.tasks import read_task_file
from meteora_jax.errors import ConfigError
from meteora_jax.generation import GenerationSettings
from meteora_jax.inputs import is_int, is_real
from meteora_jax.settings import setting
from meteora_jax.text import GeneratedRouting, generate_texts, generated_routing, routing_rows, stop_ids

MODES = ("meteora", "adapter", "base", "merged")
UNIFORM_TEMPERATURE = 1e30  # gate logits / 1e30 round to 0: every weight is exactly 1 / L
REFERENCE_COMPOSITE_TEMPERATURE = {3: 15.0, 5: 20.0, 10: 30.0}  # what the reference routed composite-n at


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prompt to answer: its task (a task folder's name, or "composite-n" for a composite
    prompt), the raw prompt text (formatted at generation), and the reference answer; a
    composite item also has the sub-task and the reference answer of every numbered line."""

    task: str
    prompt: str
    reference: str
    subtasks: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    where: str = ""

    @property
    def is_composite(self) -> bool:
        return bool(self.subtasks)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How prompts are answered: modes, batch size, new-token budget, routing temperature
    (None: the model's), the routing temperature of composite prompts in meteora mode (None: the
    routing temperature if given, else the reference's 15 / 20 / 30 for n = 3 / 5 / 10), and at
    most `limit` test samples per task (None: all)."""

    modes: tuple[str, ...] = setting(("meteora",), "routing modes to answer in")
    batch_size: int = setting(8, "prompts per batch")
    max_new_tokens: int = setting(
        GenerationSettings.max_new_tokens, "new tokens per answer (a composite answer's lines together)"
    )
    routing_temperature: float | None = setting(
        None, "gate temperature (default: the model's; composite-3/5/10: the reference's 15/20/30)"
    )
    limit: int | None = setting(
        None, "at most N test samples per task (and composite prompts of each size)", metavar="N"
    )
    composite_routing_temperature: float | None = setting(
        None,
        "gate temperature of composite prompts in meteora mode (default: --routing-temperature if "
        "given, else the reference's 15/20/30 for composite-3/5/10)",
    )

    def __post_init__(self):
        problems = []
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes or len(set(self.modes)) != len(self.modes):
            problems.append(f"--mode must be distinct values from {', '.join(MODES)}, got {list(self.modes)}")
        for name in ("batch_size", "max_new_tokens"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(
                    f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            problems.append(f"--limit must be an integer >= 1, got {self.limit!r}")
        for name in ("routing_temperature", "composite_routing_temperature"):
            t = getattr(self, name)
            if t is not None and not (is_real(t) and math.isfinite(t) and t > 0):
                problems.append(f"--{name.replace('_', '-')} must be a finite number > 0, got {t!r}")
        if problems:
            raise ConfigError("; ".join(problems))


def task_items(tasks_dir: str, names: Sequence[str], limit: int | None = None) -> dict[str, list[EvalItem]]:
    """The first `limit` prompt / response samples of every named task's test split."""
    if not os.path.isdir(tasks_dir):
        raise ConfigError(f"--tasks {tasks_dir} is not a folder of task folders")
    known = sorted(e for e in os.listdir(tasks_dir) if os.path.isdir(os.path.join(tasks_dir, e)))
    out = {}
    for name in names:
        folder = os.path.join(tasks_dir, name)
        if name not in known:
            raise ConfigError(f"--task {name}: no folder {folder} (tasks in {tasks_dir}: {', '.join(known)})")
        path = os.path.join(folder, "test.jsonl")
        if not os.path.isfile(path):
            raise ConfigError(f"--task {name}: {folder} has no test split (test.jsonl)")
        samples = [s for s in read_task_file(path, 0, [name]) if s.segments is None][:limit]
        out[name] = [EvalItem(name, s.prompt, s.response, where=s.where) for s in samples]
    return out


def task_names(tasks_dir: str) -> list[str]:
    """The task folders of `tasks_dir` that have a test split, sorted."""
    if not os.path.isdir(tasks_dir):
        raise ConfigError(f"--tasks {tasks_dir} is not a folder of task folders")
    return sorted(
        e for e in os.listdir(tasks_dir) if os.path.isfile(os.path.join(tasks_dir, e, "test.jsonl"))
    )


def mode_routing(
    mode: str,
    model,
    items: Sequence[EvalItem],
    temperature: float | None,
    *,
    composite_temperature: float | None = None,
) -> dict | None:
    """The generation routing arguments of `mode` for a batch of `items`; None for adapter mode
    on composite prompts, which `answer_by_line` answers. A composite batch in meteora mode is
    routed at `composite_temperature`, else `temperature`, else the reference's for its n."""
    names = model.adapter_names
    if mode == "base":
        return {"adapter_ids": [-1] * len(items)} if names else {}
    if not names:
        raise ConfigError(f"--mode {mode} needs adapters (--adapter or --ckpt); this model has none")
    if mode == "adapter":
        if any(item.is_composite for item in items):
            return None
        return {"adapter_ids": own_adapters(names, [item.task for item in items])}
    if mode == "merged":
        return {"routing_top_k": len(names), "routing_temperature": UNIFORM_TEMPERATURE}
    if items and items[0].is_composite:
        if composite_temperature is not None:
            temperature = composite_temperature
        elif temperature is None:
            temperature = REFERENCE_COMPOSITE_TEMPERATURE.get(len(items[0].subtasks))
    return {"routing_temperature": temperature}


def own_adapters(names: Sequence[str], tasks: Sequence[str]) -> list[int]:
    """The index of each task's adapter (adapter and task share a name) for `--mode adapter`."""
    missing = sorted({t for t in tasks if t not in names})
    if missing:
        raise ConfigError(
            f"--mode adapter: task {missing[0]} has no adapter of that name (adapters: {', '.join(names)})"
        )
    return [list(names).index(t) for t in tasks]


def newline_ids(tokenizer) -> list[int]:
    """Every token id whose text holds a line break: where a line-at-a-time answer stops."""
    ids = range(len(tokenizer))
    return [
        i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True) if "\n" in text
    ]


def answer_by_line(
    model, tokenizer, rows: Sequence[EvalItem], max_new_tokens: int, stops: Sequence[int]
) -> list[str]:
    """Composite prompts answered one numbered line at a time, line k generated (greedy, ending at
    a token of `stops`: EOS or a line break) after the prompt and lines 1..k-1 with sub-task k's
    adapter forced: the answer perfect per-line routing would give. As in the routed modes, a
    row's lines hold at most `max_new_tokens` tokens in all (line breaks included), and never run
    past the model's positions. Returns the lines joined by newlines."""
    lines: list[list[str]] = [[] for _ in rows]
    used = [0] * len(rows)  # tokens of each row's answer so far
    limit = model.config.max_position_embeddings
    for k in range(max(len(item.subtasks) for item in rows)):
        texts = [
            format_prompt(item.prompt) + "".join(f"{line}\n" for line in done)
            for item, done in zip(rows, lines, strict=True)
        ]
        longest = max(len(encode_prompt(tokenizer, t)) for t in texts)
        # One generation length (one compiled program) for every line; each row's line is then cut
        # to what its budget has left.
        budget = min(max_new_tokens, limit - longest)
        if budget <= 0 or min(used) >= max_new_tokens:
            break
        tasks = [item.subtasks[min(k, len(item.subtasks) - 1)] for item in rows]
        _, responses = generate_texts(
            model, tokenizer, texts, max_new_tokens=budget, eos_token_id=list(stops),
            adapter_ids=own_adapters(model.adapter_names, tasks),
        )  # fmt: skip
        for r, (item, done, text) in enumerate(zip(rows, lines, responses, strict=True)):
            if k >= len(item.subtasks) or used[r] >= max_new_tokens:
                continue
            ids = tokenizer(text.split("\n", 1)[0], add_special_tokens=False)["input_ids"]
            ids = ids[: max_new_tokens - used[r]]
            done.append(tokenizer.decode(ids).rstrip())
            used[r] += len(ids) + 1  # the line break that ends it
    return ["\n".join(done) for done in lines]


@dataclasses.dataclass
class Answer:
    """One generated answer: the item, the mode, the prediction text and, when asked for, how
    its generated tokens were routed."""

    item: EvalItem
    mode: str
    prediction: str
    routing: GeneratedRouting | None = None


def answer(
    model,
    tokenizer,
    items: Sequence[EvalItem],
    mode: str,
    settings: EvalSettings,
    *,
    on_batch: Callable[[], None] = lambda: None,
    want_routing: bool = False,
) -> tuple[list[Answer], list]:
    """Greedy answers of `items` in `mode`, a full batch at a time (the last one padded with
    copies, so every batch has one compiled shape); with `want_routing` (and adapters), every
    answer's routing and the viewer traces of the first batch's rows (prompt included) too
    (none for composite prompts in adapter mode, whose routing is forced line by line)."""
    answers, traces = [], []
    line_stops: list[int] = []  # EOS and line breaks, found once (a whole-vocabulary decode)
    size = settings.batch_size
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        rows = chunk + [chunk[0]] * (size - len(chunk))
        routing = mode_routing(
            mode,
            model,
            rows,
            settings.routing_temperature,
            composite_temperature=settings.composite_routing_temperature,
        )
        if routing is None:  # adapter mode on composite prompts: the line-at-a-time oracle
            line_stops = line_stops or stop_ids(model, tokenizer) + newline_ids(tokenizer)
            predictions = answer_by_line(model, tokenizer, rows, settings.max_new_tokens, line_stops)
            answers += [
                Answer(item, mode, text.strip()) for item, text in zip(chunk, predictions, strict=False)
            ]
            on_batch()
            continue
        route = want_routing and bool(model.adapter_names)
        out, responses = generate_texts(
            model,
            tokenizer,
            [format_prompt(item.prompt) for item in rows],
            max_new_tokens=settings.max_new_tokens,
            return_routing=route,
            **routing,
        )
        routed = generated_routing(out, tokenizer, model) if route else [None] * len(rows)
        if route and not traces:
            traces, _ = routing_rows(out, tokenizer, model, [item.prompt for item in rows])
            traces = traces[: len(chunk)]
        answers += [
            Answer(item, mode, text.strip(), r)
            for item, text, r in zip(chunk, responses, routed, strict=False)
        ]
        on_batch()
    return answers, traces
