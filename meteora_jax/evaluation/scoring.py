"""Answers -> scores: every task's metrics over its answers, composite prompts per sub-task (and,
with routing, how the gates switched adapters: `switching`), one record per answer for
predictions.jsonl, and the self-check that gold answers score full marks.

A composite prompt counts as fully right when each of its numbered answers is right by its
sub-task's accuracy metric (exact match, containment, the gsm8k number or the yes / no word);
a sub-task scored by BLEU / ROUGE only has no notion of right, so there its answer must equal
the reference exactly (lower-cased and stripped).

The self-check scores each prompt's gold answer written as the model is asked to answer (a
single-task prompt: the reference; a composite one: its numbered lines, `answer_text`): anything
below 1.0 means the task cannot be scored right whatever the model does (a multi-line reference
answer in a composite prompt, whose numbered line holds its first line only; a metric whose
cleaner mangles the reference).
"""

from __future__ import annotations

from collections.abc import Sequence

from meteora_jax.data.composite import answer_text
from meteora_jax.evaluation.metrics import parse_composite
from meteora_jax.evaluation.switching import answer_switch, summarize_switch

ACCURACY_KEYS = ("exact_match", "exact_match_cased", "accuracy", "yes_no_accuracy")


def task_scores(answers: Sequence, registry) -> dict[str, dict]:
    """{task: {metric: value, "samples": n}} over the single-task answers, tasks in order seen."""
    groups: dict[str, tuple[list, list]] = {}
    for a in answers:
        if not a.item.is_composite:
            preds, refs = groups.setdefault(a.item.task, ([], []))
            preds.append(a.prediction)
            refs.append(a.item.reference)
    return {task: {**registry.score(task, p, r), "samples": len(p)} for task, (p, r) in groups.items()}


def is_right(registry, task: str, prediction: str | None, reference: str) -> bool:
    """Whether one answer is right by its task's accuracy metrics (see the module docstring)."""
    prediction = "" if prediction is None else prediction
    scores = registry.score(task, [prediction], [reference])
    accuracies = [scores[k] for k in ACCURACY_KEYS if k in scores]
    if accuracies:
        return all(v == 1.0 for v in accuracies)
    return prediction.strip().lower() == reference.strip().lower()


def composite_right(registry, item, prediction: str) -> bool:
    """Whether every numbered answer of a composite `prediction` to `item` is right."""
    parsed = parse_composite(prediction, len(item.subtasks))
    return all(
        is_right(registry, task, got, want)
        for task, got, want in zip(item.subtasks, parsed, item.answers, strict=True)
    )


def composite_answers(answers: Sequence) -> dict[str, tuple[list, list]]:
    """{sub-task: (predictions, references)} of the numbered answers of composite answers (a
    missing number predicts the empty answer)."""
    out: dict[str, tuple[list, list]] = {}
    for a in answers:
        parsed = parse_composite(a.prediction, len(a.item.subtasks))
        for task, got, want in zip(a.item.subtasks, parsed, a.item.answers, strict=True):
            preds, refs = out.setdefault(task, ([], []))
            preds.append("" if got is None else got)
            refs.append(want)
    return out


def composite_scores(answers: Sequence, registry, adapter_names: Sequence[str] = ()) -> dict[str, dict]:
    """{"composite-n": {"samples", "fully_correct", "subtasks": {task: metrics}, and "switch"
    (`switching.summarize_switch`) where the answers carry their routing}} of the composite
    answers."""
    groups: dict[str, list] = {}
    for a in answers:
        if a.item.is_composite:
            groups.setdefault(a.item.task, []).append(a)
    out = {}
    for name, group in groups.items():
        per_task = composite_answers(group)
        right = [composite_right(registry, a.item, a.prediction) for a in group]
        out[name] = {
            "samples": len(group),
            "fully_correct": sum(right) / len(group),
            "subtasks": {
                task: {**registry.score(task, p, r), "samples": len(p)} for task, (p, r) in per_task.items()
            },
        }
        switch = summarize_switch([switch_record(a, adapter_names) for a in group])
        if switch is not None:
            out[name]["switch"] = switch
    return out


def switch_record(a, adapter_names: Sequence[str]) -> list[dict] | None:
    """`switching.answer_switch` of a composite answer with routing; None without."""
    if a.routing is None or not a.item.is_composite:
        return None
    return answer_switch(a.routing.pieces, a.routing.weights_nl, a.item.subtasks, adapter_names)


def answer_record(a, registry, adapter_names: Sequence[str] = ()) -> dict:
    """One line of predictions.jsonl: the answer and its scores (per numbered line for a
    composite prompt, with its switch figures when the answer carries its routing)."""
    record = {
        "mode": a.mode,
        "task": a.item.task,
        "where": a.item.where,
        "prompt": a.item.prompt,
        "prediction": a.prediction,
        "reference": a.item.reference,
    }
    if a.item.is_composite:
        parsed = parse_composite(a.prediction, len(a.item.subtasks))
        record["answers"] = [
            {
                "subtask": task,
                "prediction": got,
                "reference": want,
                "right": is_right(registry, task, got, want),
            }
            for task, got, want in zip(a.item.subtasks, parsed, a.item.answers, strict=True)
        ]
        record["right"] = all(x["right"] for x in record["answers"])
        switch = switch_record(a, adapter_names)
        if switch is not None:
            record["switch"] = switch
    else:
        record["score"] = registry.score(a.item.task, [a.prediction], [a.item.reference])
        record["right"] = is_right(registry, a.item.task, a.prediction, a.item.reference)
    return record


def gold_answer(item) -> str:
    """The answer that scores full marks, written as the model is asked to answer `item`."""
    return answer_text(item.answers) if item.is_composite else item.reference.strip()


def self_check(items: Sequence, registry) -> dict[str, float]:
    """{task or composite name: share of its items whose gold answer is right} (module docstring),
    names in order seen."""
    right: dict[str, list[bool]] = {}
    for item in items:
        gold = gold_answer(item)
        ok = (
            composite_right(registry, item, gold)
            if item.is_composite
            else is_right(registry, item.task, gold, item.reference)
        )
        right.setdefault(item.task, []).append(ok)
    return {name: sum(oks) / len(oks) for name, oks in right.items()}
