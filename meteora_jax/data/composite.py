"""Composite-n prompts: the test questions of n tasks bundled in one prompt after a two-example prefix.

MeteoRA's claim is that one model switches adapters mid-prompt; a composite-n prompt tests it by
asking n tasks' questions at once (docs/method.md). The layout follows the reference
(NJUDeepEngine/meteora `data/create_composite.py`), for n = 3 sub-tasks A, B, C:

    Example 1:
    <blank>
    <train prompt of A>
    <blank>
    <train prompt of B>
    <blank>
    <train prompt of C>
    <blank>
    1. <its answer of A>
    2. <its answer of B>
    3. <its answer of C>
    <blank>
    <blank>
    Example 2:
    ... (the same with a second train sample of each task)
    <blank>
    <blank>
    Following the example above, generate answers to the questions below:
    <blank>
    <test prompt of A>
    <blank>
    <test prompt of B>
    <blank>
    <test prompt of C>

and a final newline. The model is expected to answer with numbered lines "1. ...", "2. ...".

The "numbered" layout is the compact one for models trained on the format (no few-shot prefix):
the sub-prompts as numbered lines, "1. <test prompt of A>\n2. <test prompt of B>\n3. <test
prompt of C>", answered the same way.
Every prompt and answer is the task file's text as it is (example answers are stripped of
surrounding whitespace, being one numbered line each). The text is raw: the caller wraps it
with `meteora_jax.data.prompts.format_prompt` ("[INST] {text} [/INST]\\n") as it wraps any
prompt. Two differences from the reference, both because its task files stored prompts already
formatted as "[INST] ... [/INST]\\n" and it fed the composite text unwrapped: here the
sub-prompts are the plain task inputs (one "[INST]" wrap around the whole), and the text does
not start with the reference's empty line.

Choices (the reference had none to make, its prefix being hand-written for three task lists):
- Sub-tasks: an explicit list (its order is the prompt's order); else, for n, the reference
  preset of that size (`PRESETS`) when all its task folders exist; else n tasks drawn with the
  seed from the task folders (those holding train.jsonl and test.jsonl).
- The two examples are drawn once per build from each sub-task's train split (seeded, kept in
  file order), so every prompt of a file shares one fixed prefix, as in the reference; samples
  whose response is one line are preferred while there are two, since a multi-line example
  answer would break the numbered-line answer format.
- Test items are drawn without replacement (as the reference did): each test sample of a
  sub-task appears in at most one prompt, so `samples` may not exceed any test split's size.
- Samples given as "segments" (training material) are skipped; an empty prompt or response is
  an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable, Sequence

from meteora_jax.data.prompts import PROMPT_TEMPLATE
from meteora_jax.data.tasks import Sample, read_task_file
from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.inputs import is_int
from meteora_jax.io.files import (
    API_SETTING,
    check_output_path,
    raise_problems,
    refuse_existing,
    write_text_atomic,
)
from meteora_jax.io.jsonl import read_jsonl
from meteora_jax.settings import setting

PRESETS = {
    "composite-3": ("logical_deduction", "question_selection", "strategyqa"),
    "composite-5": (
        "logical_deduction",
        "question_selection",
        "abstract_narrative_understanding",
        "goal_step_wikihow",
        "strategyqa",
    ),
    "composite-10": (
        "logical_deduction",
        "question_selection",
        "abstract_narrative_understanding",
        "goal_step_wikihow",
        "winowhy",
        "strategyqa",
        "disfl_qa",
        "news_commentary_de",
        "alpaca",
        "linguistics_puzzles",
    ),
}
INSTRUCTION = "Following the example above, generate answers to the questions below:"
ANSWER_SEPARATOR = "@@@@\n"  # joins the sub-answers into one reference response, as the reference did
LINE_KEYS = ("prompt", "response", "subtasks", "answers")
COMPOSITE_LAYOUTS = ("reference", "numbered")  # few-shot prefix (the reference's) | numbered questions
DEFAULT_LAYOUT = "reference"
NUM_EXAMPLES = 2
MIN_SUBTASKS = 2
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class CompositeSettings:
    """What to build: `n` sub-tasks per prompt, or the explicit `subtasks` (then n is their
    number; giving both requires they agree), `samples` prompts, the `seed` of every draw, and
    the `layout` (`COMPOSITE_LAYOUTS`, module docstring)."""

    n: int | None = None
    subtasks: tuple[str, ...] | None = None
    samples: int = setting(200, "prompts to write")
    seed: int = setting(0, "seed of every draw")
    layout: str = setting(
        DEFAULT_LAYOUT,
        "reference: the few-shot prefix of the MeteoRA reference (for real models); numbered: the "
        "questions as numbered lines, no prefix (for models trained on that format)",
        choices=COMPOSITE_LAYOUTS,
    )

    def __post_init__(self):
        problems = []
        if self.layout not in COMPOSITE_LAYOUTS:
            problems.append(f"layout must be one of {', '.join(COMPOSITE_LAYOUTS)}, got {self.layout!r}")
        subtasks = self.subtasks
        if subtasks is not None:
            if isinstance(subtasks, str) or not all(isinstance(t, str) and t for t in subtasks):
                raise ConfigError(f"subtasks must be a list of task names, got {subtasks!r}")
            subtasks = tuple(subtasks)
            object.__setattr__(self, "subtasks", subtasks)
            repeated = sorted({t for t in subtasks if subtasks.count(t) > 1})
            if repeated:
                problems.append(f"subtasks repeats {', '.join(repeated)}")
            if self.n is None:
                object.__setattr__(self, "n", len(subtasks))
        n = self.n
        if n is None:
            problems.append("give n (the number of sub-tasks per prompt) or the subtasks list")
        elif not is_int(n) or n < MIN_SUBTASKS:
            problems.append(
                f"n must be an integer >= {MIN_SUBTASKS} (a composite of several tasks), got {n!r}"
            )
        elif subtasks is not None and len(subtasks) != n:
            problems.append(f"n is {n} but subtasks names {len(subtasks)} tasks ({', '.join(subtasks)})")
        if not is_int(self.samples) or self.samples < 1:
            problems.append(f"samples must be an integer >= 1, got {self.samples!r}")
        if not is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if problems:
            raise ConfigError("; ".join(problems))


def task_folders(tasks_dir: str | os.PathLike) -> list[str]:
    """The sorted names of the folders of `tasks_dir` holding both train.jsonl and test.jsonl."""
    tasks_dir = os.fspath(tasks_dir)
    if not os.path.isdir(tasks_dir):
        raise ConfigError(
            f"tasks dir {tasks_dir} does not exist (expected TASKS/<task>/train.jsonl, test.jsonl)"
        )
    return sorted(
        e
        for e in os.listdir(tasks_dir)
        if not e.startswith(".")
        and all(os.path.isfile(os.path.join(tasks_dir, e, f"{s}.jsonl")) for s in SPLITS)
    )


def _check_named(tasks_dir: str, names: Sequence[str], what: str) -> None:
    """Every named task has a folder with both splits; all missing ones named at once."""
    problems = []
    for name in names:
        folder = os.path.join(tasks_dir, name)
        if name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            problems.append(f"{name!r} is not a task folder name")
        elif not os.path.isdir(folder):
            problems.append(f"task {name}: no folder {folder}")
        else:
            problems += [
                f"task {name}: no {s} split {os.path.join(folder, f'{s}.jsonl')}"
                for s in SPLITS
                if not os.path.isfile(os.path.join(folder, f"{s}.jsonl"))
            ]
    raise_problems(ConfigError, f"{what} in tasks dir {tasks_dir}", problems)


def resolve_subtasks(
    tasks_dir: str | os.PathLike, settings: CompositeSettings
) -> tuple[tuple[str, ...], str]:
    """(the sub-task names in prompt order, how they were chosen: "given", "preset composite-N"
    or "drawn" (with the seed)); see the module docstring for the rule.

    Raises:
        ConfigError: a missing tasks dir, a named task without its folder or a split (all named),
            or n larger than the number of task folders.
    """
    tasks_dir = os.fspath(tasks_dir)
    available = task_folders(tasks_dir)
    if settings.subtasks is not None:
        _check_named(tasks_dir, settings.subtasks, "subtasks")
        return settings.subtasks, "given"
    for name, preset in PRESETS.items():
        if len(preset) == settings.n and all(t in available for t in preset):
            return preset, f"preset {name}"
    if settings.n > len(available):
        raise ConfigError(
            f"tasks dir {tasks_dir} holds {len(available)} task folders with train.jsonl and test.jsonl "
            f"({', '.join(available) or 'none'}); n={settings.n} needs {settings.n}"
        )
    drawn = random.Random(f"{settings.seed}:subtasks").sample(available, settings.n)
    return tuple(drawn), "drawn"


def _split_samples(tasks_dir: str, task: str, split: str, subtasks: Sequence[str]) -> list[Sample]:
    """The prompt / response samples of one split (segments samples skipped), none empty."""
    samples = read_task_file(os.path.join(tasks_dir, task, f"{split}.jsonl"), subtasks.index(task), subtasks)
    usable = [s for s in samples if s.segments is None]
    for s in usable:
        for field in ("prompt", "response"):
            if not getattr(s, field).strip():
                raise ConfigError(f'{s.where}: task {task}: "{field}" is empty')
    return usable


def _pick_examples(train: list[Sample], rng: random.Random) -> list[Sample]:
    """`NUM_EXAMPLES` train samples in file order, one-line answers preferred (module docstring)."""
    one_line = [s for s in train if "\n" not in s.response.strip()]
    pool = one_line if len(one_line) >= NUM_EXAMPLES else train
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), NUM_EXAMPLES))]


def composite_pieces(
    examples: Sequence[Sequence[tuple[str, str]]], questions: Sequence[str], layout: str = DEFAULT_LAYOUT
) -> list[tuple[int | None, str]]:
    """The composite prompt text as (sub-task index, text) pieces: each sub-task's prompts and
    example answers carry its index, the template text between them None.

    Args:
        examples: per example, one (prompt, answer) pair per sub-task, in sub-task order (the
            "numbered" layout has none: pass []).
        questions: one test prompt per sub-task, in sub-task order.
        layout: one of `COMPOSITE_LAYOUTS`.
    """
    if layout == "numbered":
        if examples:
            raise ConfigError("the numbered composite layout has no few-shot examples")
        return [
            (k, f"{k + 1}. {q}" + ("\n" if k + 1 < len(questions) else "")) for k, q in enumerate(questions)
        ]
    if layout != "reference":
        raise ConfigError(f"layout must be one of {', '.join(COMPOSITE_LAYOUTS)}, got {layout!r}")
    pieces: list[tuple[int | None, str]] = []
    for number, pairs in enumerate(examples, 1):
        pieces.append((None, f"Example {number}:\n\n"))
        pieces += [(k, f"{prompt}\n\n") for k, (prompt, _) in enumerate(pairs)]
        pieces += [(k, f"{k + 1}. {answer.strip()}\n") for k, (_, answer) in enumerate(pairs)]
        pieces.append((None, "\n\n"))
    pieces.append((None, f"{INSTRUCTION}\n\n"))
    pieces += [(k, q + ("\n\n" if k + 1 < len(questions) else "\n")) for k, q in enumerate(questions)]
    return pieces


def composite_text(
    examples: Sequence[Sequence[tuple[str, str]]], questions: Sequence[str], layout: str = DEFAULT_LAYOUT
) -> str:
    """The composite prompt text (layouts in the module docstring; arguments as `composite_pieces`)."""
    return "".join(text for _, text in composite_pieces(examples, questions, layout))


def answer_text(answers: Sequence[str]) -> str:
    """The answer a composite prompt asks for: one numbered line per sub-answer."""
    return "\n".join(f"{i}. {answer.strip()}" for i, answer in enumerate(answers, 1))


def labelled_segments(
    examples: Sequence[Sequence[tuple[str, str]]],
    questions: Sequence[str],
    answers: Sequence[str],
    subtasks: Sequence[str],
    layout: str = DEFAULT_LAYOUT,
) -> list[dict]:
    """A composite prompt, formatted and answered, as a training sample's `segments`
    ([{"task", "text"}]): every sub-task's prompts and answer lines are labelled with that
    sub-task, and template text (the chat template's too) with the sub-task of the labelled piece
    after it (so the gate learns to switch where the next sub-task begins)."""
    before, after = PROMPT_TEMPLATE.split("{input}")
    pieces = [(None, before), *composite_pieces(examples, questions, layout), (None, after)]
    lines = answer_text(answers).split("\n")
    pieces += [(k, line + ("\n" if k + 1 < len(lines) else "")) for k, line in enumerate(lines)]
    segments, following = [], None
    for k, text in reversed(pieces):
        following = following if k is None else k
        segments.append({"task": subtasks[following], "text": text})
    return segments[::-1]


def build_composite(
    tasks_dir: str | os.PathLike,
    n: int | None = None,
    subtasks: Sequence[str] | None = None,
    samples: int = CompositeSettings.samples,
    seed: int = 0,
    layout: str = DEFAULT_LAYOUT,
) -> list[dict]:
    """`samples` composite prompts over the task folders of `tasks_dir`, the same for a seed.

    Sub-tasks: `subtasks` when given, else the preset for `n` when its folders exist, else n
    drawn (module docstring); `layout`: one of `COMPOSITE_LAYOUTS` (the numbered one reads no
    train split). Returns lines {"prompt": raw text (the caller wraps it with
    `format_prompt`), "response": the sub-answers joined by "@@@@\\n", "subtasks": [names in
    prompt order], "answers": [the reference answer of each numbered line]}.

    Raises:
        ConfigError: bad settings, a missing task folder or split, n above the number of tasks,
            a train split with fewer than two samples or a test split with fewer than `samples`
            (every short task named at once), or a bad line (file and line number).
    """
    tasks_dir = os.fspath(tasks_dir)
    settings = CompositeSettings(n=n, subtasks=subtasks, samples=samples, seed=seed, layout=layout)
    few_shot = layout == "reference"
    names, _ = resolve_subtasks(tasks_dir, settings)
    examples, tests, problems = [], [], []
    for task in names:
        train = _split_samples(tasks_dir, task, "train", names) if few_shot else []
        test = _split_samples(tasks_dir, task, "test", names)
        train_path, test_path = (os.path.join(tasks_dir, task, f"{s}.jsonl") for s in SPLITS)
        if few_shot and len(train) < NUM_EXAMPLES:
            problems.append(
                f"task {task}: {train_path} holds {len(train)} prompt / response samples; "
                f"the {NUM_EXAMPLES} few-shot examples need {NUM_EXAMPLES}"
            )
        if len(test) < settings.samples:
            problems.append(
                f"task {task}: {test_path} holds {len(test)} prompt / response samples; {settings.samples} "
                "composite prompts use each at most once (lower samples)"
            )
        if not problems and few_shot:
            examples.append(_pick_examples(train, random.Random(f"{seed}:{task}:train")))
        if not problems:
            tests.append(random.Random(f"{seed}:{task}:test").sample(test, settings.samples))
    raise_problems(ConfigError, f"tasks dir {tasks_dir}", problems)
    shots = [
        [(per_task[k].prompt, per_task[k].response) for per_task in examples]
        for k in range(NUM_EXAMPLES if few_shot else 0)
    ]
    lines = []
    for row in zip(*tests, strict=True):
        answers = [s.response for s in row]
        lines.append(
            {
                "prompt": composite_text(shots, [s.prompt for s in row], layout),
                "response": ANSWER_SEPARATOR.join(answers),
                "subtasks": list(names),
                "answers": answers,
            }
        )
    return lines


def _check_line(record, where: str) -> dict:
    """A composite line's problems as one ConfigError naming `where`; returns the record."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with {', '.join(LINE_KEYS)}")
    missing = [k for k in LINE_KEYS if k not in record]
    if missing:
        what = " (a composite line names its sub-tasks)" if "subtasks" in missing else ""
        raise ConfigError(f"{where}: missing {', '.join(missing)}{what}")
    prompt, response, subtasks, answers = (record[k] for k in LINE_KEYS)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f'{where}: "prompt" must be a non-empty string')
    if not isinstance(subtasks, list) or not all(isinstance(t, str) and t for t in subtasks):
        raise ConfigError(f'{where}: "subtasks" must be a list of task names, got {subtasks!r}')
    if len(subtasks) < MIN_SUBTASKS or len(set(subtasks)) != len(subtasks):
        raise ConfigError(
            f'{where}: "subtasks" must name {MIN_SUBTASKS} or more distinct tasks, got {subtasks}'
        )
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f'{where}: "answers" must be a list of strings')
    if len(answers) != len(subtasks):
        raise ConfigError(
            f"{where}: {len(answers)} answers for {len(subtasks)} sub-tasks ({', '.join(subtasks)})"
        )
    if response != ANSWER_SEPARATOR.join(answers):
        raise ConfigError(f'{where}: "response" is not the answers joined by {ANSWER_SEPARATOR!r}')
    return record


def write_composite(
    lines: Sequence[dict],
    out_path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    setting: str = API_SETTING,
) -> str:
    """Writes composite `lines` as JSONL to `out_path` atomically; returns its absolute path.

    `inputs` ((flag, path) pairs, e.g. ("--tasks", TASKS)) may not contain or be the output, and
    an existing file is replaced only with `force`; `setting` names the output in messages.
    Every line is checked as `read_composite` checks it, so the file reads back.
    """
    inputs = list(inputs)
    check_output_path(out_path, inputs=inputs, setting=setting)
    if os.path.isdir(out_path):
        raise ConfigError(f"{setting} {os.fspath(out_path)} is a folder: name the .jsonl file to write")
    refuse_existing(out_path, force=force, setting=setting)
    if isinstance(lines, str | dict) or not lines:
        raise ConfigError("no composite lines to write")
    text = "".join(
        json.dumps(_check_line(line, f"composite line {i}"), ensure_ascii=False) + "\n"
        for i, line in enumerate(lines, 1)
    )
    path = os.path.abspath(os.fspath(out_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, text)
    return path


def read_composite(path: str | os.PathLike) -> list[dict]:
    """The composite lines of a JSONL file (blank lines skipped), each checked: the four keys of
    `build_composite` (other keys are kept, unread), sub-task names, one answer per sub-task, and
    the response being the answers joined by "@@@@\\n".

    Raises:
        MissingFileError: no such file.
        ConfigError: a bad line (file and line number), or no line at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"composite file {path} does not exist")
    lines = [_check_line(record, where) for where, record in read_jsonl(path)]
    if not lines:
        raise ConfigError(f"{path}: holds no composite prompts")
    return lines
