"""Answers -> scores: every task's metrics over its answers, composite prompts per sub-task, and
one record per answer for predictions.jsonl.

A composite prompt counts as fully right when each of its numbered answers is right by its
sub-task's accuracy metric (exact match, containment, the gsm8k number or the yes / no word);
a sub-task scored by BLEU / ROUGE only has no notion of right, so there its answer must equal
the reference exactly (lower-cased and stripped).
"""

from __future__ import annotations

from collections.abc import Sequence

from meteora_jax.evaluation.metrics import parse_composite

ACCURACY_KEYS = ("exact_match", "accuracy", "yes_no_accuracy")


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


def composite_scores(answers: Sequence, registry) -> dict[str, dict]:
    """{"composite-n": {"samples", "fully_correct", "subtasks": {task: metrics}}} of the
    composite answers."""
    groups: dict[str, list] = {}
    for a in answers:
        if a.item.is_composite:
            groups.setdefault(a.item.task, []).append(a)
    out = {}
    for name, group in groups.items():
        per_task = composite_answers(group)
        right = [
            all(
                is_right(registry, task, got, want)
                for task, got, want in zip(
                    a.item.subtasks,
                    parse_composite(a.prediction, len(a.item.subtasks)),
                    a.item.answers,
                    strict=True,
                )
            )
            for a in group
        ]
        out[name] = {
            "samples": len(group),
            "fully_correct": sum(right) / len(group),
            "subtasks": {
                task: {**registry.score(task, p, r), "samples": len(p)} for task, (p, r) in per_task.items()
            },
        }
    return out


def answer_record(a, registry) -> dict:
    """One line of predictions.jsonl: the answer and its scores (per numbered line for a
    composite prompt)."""
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
    else:
        record["score"] = registry.score(a.item.task, [a.prediction], [a.item.reference])
        record["right"] = is_right(registry, a.item.task, a.prediction, a.item.reference)
    return record
