"""Switch metrics: within one composite answer, do the gates move to each sub-task's adapter as the
model moves on to that sub-task's numbered answer line? (MeteoRA's point: one generation, many
adapters, switched token by token.)

Dimensions: N generated tokens, L adapters.

Sub-answer i of a composite answer is its generated tokens from the one where line "i." starts
through the one before the next numbered answer line starts (the last runs to the end of the
answer); the lines are found by `metrics.composite_lines`, the rule that scores the answer, over
the tokens' display pieces. A token's dominant adapter is the one with the most routing weight,
averaged over layers and projections (`viz.adapter_weights`); a token no adapter routed has none.
Per sub-answer: the token accuracy (share of its tokens whose dominant adapter is the sub-task's
own, the adapter of the same name) and the switch lag (tokens before the first such token; the
sub-answer's length when none is). A sub-task without an adapter of its name cannot be judged and
is left out, as is a line missing from the answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from meteora_jax.evaluation.metrics import composite_lines
from meteora_jax.viz import dominant_adapters

NO_LINE, NO_ADAPTER = "no such line in the answer", "no adapter of that name"


def answer_spans(pieces: Sequence[str], n: int) -> list[tuple[int, int] | None]:
    """[start, end) token range of each numbered answer 1..n in a generated answer given as its
    tokens' display pieces (concatenating to its text); None for a line the answer lacks (or one
    sharing its first token with the next line, so holding no token of its own)."""
    ends_n = np.cumsum([len(p) for p in pieces])
    starts = {i: line[0] for i, line in enumerate(composite_lines("".join(pieces), n)) if line is not None}
    order = sorted(starts, key=starts.get)
    # the token holding character c is the first whose end lies past c
    first_token = {i: int(np.searchsorted(ends_n, starts[i], side="right")) for i in order}
    spans: list[tuple[int, int] | None] = [None] * n
    for j, i in enumerate(order):
        end = first_token[order[j + 1]] if j + 1 < len(order) else len(pieces)
        if end > first_token[i]:
            spans[i] = (first_token[i], end)
    return spans


def sub_answer_switch(dominant_n: np.ndarray, expected: int) -> dict:
    """{"tokens", "right", "accuracy", "lag"} of one sub-answer's tokens (N >= 1) against the
    adapter index it should be routed to."""
    right_n = np.asarray(dominant_n) == expected
    tokens = len(right_n)
    lag = int(np.argmax(right_n)) if right_n.any() else tokens
    return {"tokens": tokens, "right": int(right_n.sum()), "accuracy": float(right_n.mean()), "lag": lag}


def answer_switch(
    pieces: Sequence[str], weights_nl: np.ndarray, subtasks: Sequence[str], adapter_names: Sequence[str]
) -> list[dict]:
    """Per sub-task of a composite answer, in prompt order: {"subtask", "tokens", "right",
    "accuracy", "lag", "mostly" (the adapter dominating most of its tokens, None: none)} or
    {"subtask", "left_out": why} (module docstring).

    pieces: the display piece of each of the N generated tokens; weights_nl: (N, L) their mean
    routing weight per adapter.
    """
    dominant_n = dominant_adapters(weights_nl)
    if len(dominant_n) != len(pieces):
        raise ValueError(f"{len(pieces)} token pieces but routing weights for {len(dominant_n)} tokens")
    out = []
    for task, span in zip(subtasks, answer_spans(pieces, len(subtasks)), strict=True):
        if task not in adapter_names:
            out.append({"subtask": task, "left_out": NO_ADAPTER})
        elif span is None:
            out.append({"subtask": task, "left_out": NO_LINE})
        else:
            part_n = dominant_n[span[0] : span[1]]
            routed = part_n[part_n >= 0]
            mostly = adapter_names[int(np.bincount(routed).argmax())] if len(routed) else None
            figures = sub_answer_switch(part_n, list(adapter_names).index(task))
            out.append({"subtask": task, **figures, "mostly": mostly})
    return out


def _figures(judged: Sequence[dict]) -> dict:
    tokens = sum(x["tokens"] for x in judged)
    lags = [x["lag"] for x in judged]
    return {
        "accuracy": sum(x["right"] for x in judged) / tokens if tokens else None,
        "median_lag": float(statistics.median(lags)) if lags else None,
        "mean_lag": float(statistics.mean(lags)) if lags else None,
        "sub_answers": len(judged),
    }


def summarize_switch(answers: Sequence[Sequence[dict] | None]) -> dict | None:
    """The switch figures of many composite answers (each `answer_switch`'s list; None: an answer
    generated without routing, skipped): {"accuracy" (token-weighted over all sub-answers),
    "median_lag", "mean_lag", "sub_answers", "subtasks": {task: {"accuracy", "median_lag",
    "sub_answers"}}, "missing_lines" (sub-answers whose line the answer lacks), "no_adapter"
    (sub-tasks left out: no adapter of that name)}; None when no answer has routing. Figures of
    nothing are None."""
    routed = [a for a in answers if a is not None]
    if not routed:
        return None
    subs = [x for a in routed for x in a]
    judged = [x for x in subs if "left_out" not in x]
    per_task: dict[str, list[dict]] = {}
    for x in subs:
        if x.get("left_out") != NO_ADAPTER:
            per_task.setdefault(x["subtask"], []).append(x)
    return {
        **_figures(judged),
        "subtasks": {
            task: {
                k: v for k, v in _figures([x for x in xs if "left_out" not in x]).items() if k != "mean_lag"
            }
            for task, xs in per_task.items()
        },
        "missing_lines": sum(x.get("left_out") == NO_LINE for x in subs),
        "no_adapter": sorted({x["subtask"] for x in subs if x.get("left_out") == NO_ADAPTER}),
    }
