"""Which metrics score which task: the reference's table, overridable by a JSON file.

A task names metrics and one answer cleaner, applied alike to predictions and references before
scoring. A metric may carry its own cleaner, which replaces the task's for that metric alone: so
strategyqa scores BLEU / ROUGE on the stripped text but yes / no on the first word.

The JSON file maps task names to `{"metrics": [...], "cleaner": "..."}` ("cleaner" optional,
"strip" when omitted); an entry replaces that task's whole entry, and the key "*" replaces the
default entry, used for every task neither the table nor the file names (exact-match accuracy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.evaluation import metrics

DEFAULT_KEY = "*"
ENTRY_FIELDS = ("metrics", "cleaner")


@dataclass(frozen=True)
class Metric:
    """A score over (prediction, reference) lists, the result keys it returns, and the cleaner it
    always uses (None: the task's)."""

    fn: Callable[[Sequence[str], Sequence[str]], dict[str, float]]
    keys: tuple[str, ...]
    cleaner: str | None = None

    def __post_init__(self):
        if self.cleaner is not None and self.cleaner not in metrics.CLEANERS:
            raise ConfigError(
                f"unknown cleaner {self.cleaner!r}; known cleaners: {', '.join(metrics.CLEANERS)}"
            )


def _accuracy(key: str, mode: str, cleaner: str | None = None) -> Metric:
    return Metric(lambda p, r: {key: metrics.accuracy(p, r, mode=mode)}, (key,), cleaner)


METRICS: dict[str, Metric] = {
    "exact": _accuracy("exact_match", "exact"),
    "exact_cased": _accuracy("exact_match_cased", "exact_cased"),
    "contains": _accuracy("accuracy", "contains"),
    "bleu": Metric(lambda p, r: {"bleu": metrics.bleu(p, r)}, ("bleu",)),
    "rouge": Metric(metrics.rouge, metrics.ROUGE_TYPES),
    "yes_no": _accuracy("yes_no_accuracy", "exact", "first_word"),  # strategyqa: the yes / no agree
    "number": _accuracy("accuracy", "exact", "gsm8k"),  # gsm8k: the final numbers agree
}


@dataclass(frozen=True)
class TaskScoring:
    """How one task is scored: metric names (see METRICS) and the cleaner (see metrics.CLEANERS)
    of the metrics that carry none. Raises ConfigError naming an unknown metric or cleaner."""

    metrics: tuple[str, ...]
    cleaner: str = "strip"

    def __post_init__(self):
        if not isinstance(self.metrics, tuple) or not all(isinstance(m, str) for m in self.metrics):
            raise ConfigError(f"metrics must be a tuple of metric names, not {self.metrics!r}")
        if not self.metrics:
            raise ConfigError(f"no metrics named; known metrics: {', '.join(METRICS)}")
        for name in self.metrics:
            if name not in METRICS:
                raise ConfigError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        if not isinstance(self.cleaner, str) or self.cleaner not in metrics.CLEANERS:
            raise ConfigError(
                f"unknown cleaner {self.cleaner!r}; known cleaners: {', '.join(metrics.CLEANERS)}"
            )
        keys = [key for name in self.metrics for key in METRICS[name].keys]
        clashes = sorted({key for key in keys if keys.count(key) > 1})
        if clashes:
            raise ConfigError(f"metrics {list(self.metrics)} give the result {', '.join(clashes)} twice")


_EXACT = TaskScoring(("exact",))


@dataclass(frozen=True)
class Registry:
    """Task name -> TaskScoring (read-only), with `default` for every task not named."""

    tasks: Mapping[str, TaskScoring]
    default: TaskScoring = _EXACT

    def __post_init__(self):
        for task, entry in {**self.tasks, DEFAULT_KEY: self.default}.items():
            if not isinstance(task, str) or not isinstance(entry, TaskScoring):
                raise ConfigError(f"task {task!r}: a registry entry is a TaskScoring, not {entry!r}")
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))

    def scoring(self, task: str) -> TaskScoring:
        """The task's entry, or the default one."""
        return self.tasks.get(task, self.default)

    def score(self, task: str, preds: Sequence[str | None], refs: Sequence[str]) -> dict[str, float]:
        """{result key: value} of the task's metrics over the pairs, after cleaning both sides.

        A None prediction (a missing composite answer) is scored as the empty answer; empty answers
        are scored, never dropped. Raises ValueError for unequal lengths or no pairs.
        """
        if len(preds) != len(refs):
            raise ValueError(f"task {task!r}: {len(preds)} predictions but {len(refs)} references")
        if not preds:
            raise ValueError(f"task {task!r}: no answers to score")
        entry = self.scoring(task)
        raw = ["" if p is None else p for p in preds]
        cleaned: dict[str, tuple[list[str], list[str]]] = {}
        out: dict[str, float] = {}
        for name in entry.metrics:
            metric = METRICS[name]
            cleaner_name = metric.cleaner or entry.cleaner
            if cleaner_name not in cleaned:
                clean = metrics.CLEANERS[cleaner_name]
                cleaned[cleaner_name] = ([clean(p) for p in raw], [clean(r) for r in refs])
            out.update(metric.fn(*cleaned[cleaner_name]))
        return out


_CONTAINS = TaskScoring(("contains",))
_TEXT = TaskScoring(("bleu", "rouge"))
_TRANSLATION = TaskScoring(("bleu",))

DEFAULT_REGISTRY = Registry(
    {
        **dict.fromkeys(
            (
                "formal_fallacies_syllogisms_negation",
                "winowhy",
                "elementary_math_qa",
                "cs_algorithms",
                "tracking_shuffled_objects",
                "unit_conversion",
                "paragraph_segmentation",
                "epistemic_reasoning",
            ),
            _EXACT,
        ),
        **dict.fromkeys(
            (
                "language_identification",
                "logical_deduction",
                "play_dialog_same_or_different",
                "vitaminc_fact_verification",
                "abstract_narrative_understanding",
                "contextual_parametric_knowledge_conflicts",
                "object_counting",
                "question_selection",
                "goal_step_wikihow",
                "disfl_qa",
                "reasoning_about_colored_objects",
            ),
            _CONTAINS,
        ),
        **dict.fromkeys(("linguistics_puzzles", "cnn_dailymail", "topical_chat", "alpaca"), _TEXT),
        **dict.fromkeys(("news_commentary_de", "news_commentary_es", "news_commentary_it"), _TRANSLATION),
        "strategyqa": TaskScoring(("bleu", "rouge", "yes_no")),
        "gsm8k": TaskScoring(("number",)),
    },
)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _entry(path: str, task: str, raw: object) -> TaskScoring:
    """One task's JSON entry as a TaskScoring; every problem names the file and the task."""
    where = f"{path}: " + ("the default entry '*'" if task == DEFAULT_KEY else f"task {task!r}")
    if not isinstance(raw, dict):
        raise ConfigError(
            f'{where}: an entry is an object {{"metrics": [...], "cleaner": "..."}}, not {_json_type(raw)}'
        )
    unknown = sorted(set(raw) - set(ENTRY_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {', '.join(unknown)}; known fields: {', '.join(ENTRY_FIELDS)}"
        )
    if "metrics" not in raw:
        raise ConfigError(f'{where}: no "metrics" (an array of metric names: {", ".join(METRICS)})')
    names = raw["metrics"]
    if not isinstance(names, list) or not all(isinstance(m, str) for m in names):
        raise ConfigError(f'{where}: "metrics" must be an array of metric names, not {_json_type(names)}')
    cleaner = raw.get("cleaner", "strip")
    if not isinstance(cleaner, str):
        raise ConfigError(f'{where}: "cleaner" must be a cleaner name (a string), not {_json_type(cleaner)}')
    try:
        return TaskScoring(tuple(names), cleaner)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """DEFAULT_REGISTRY, with the entries of the JSON file at `path` (if any) replacing or adding
    tasks (see the module docstring). Raises MissingFileError, or ConfigError naming the file and
    the task at fault."""
    if path is None:
        return DEFAULT_REGISTRY
    path = os.fspath(path)
    file = Path(path)
    if not file.exists():
        raise MissingFileError(f"metrics file {path} does not exist")
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"metrics file {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"metrics file {path} is not valid JSON: {err}") from None
    if not isinstance(table, dict):
        raise ConfigError(
            f"metrics file {path}: the top level must be an object of task -> entry, not {_json_type(table)}"
        )
    entries = {task: _entry(path, task, raw) for task, raw in table.items()}
    default = entries.pop(DEFAULT_KEY, DEFAULT_REGISTRY.default)
    return Registry({**DEFAULT_REGISTRY.tasks, **entries}, default=default)
