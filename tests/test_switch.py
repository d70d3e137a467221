"""Switch metrics on hand-built routing traces whose dominant adapters are known: the sub-answer
token ranges, token accuracy and switch lag, missing lines, sub-tasks without an adapter, and
answers without routing."""

from __future__ import annotations

import numpy as np
import pytest

from meteora_jax import viz
from meteora_jax.evaluation.metrics import composite_lines, parse_composite
from meteora_jax.evaluation.registry import load_registry
from meteora_jax.evaluation.report import report_markdown
from meteora_jax.evaluation.runner import Answer, EvalItem
from meteora_jax.evaluation.scoring import answer_record, composite_scores
from meteora_jax.evaluation.switching import (
    NO_ADAPTER,
    NO_LINE,
    answer_spans,
    answer_switch,
    summarize_switch,
)
from meteora_jax.ops.routing import Routing
from meteora_jax.text import GeneratedRouting

NAMES = ("alpha", "beta", "gamma")
# "1. abc\n2. de\n3. f" as a tokenizer might cut it: "\n2" is one token, so line 2 starts inside it.
PIECES = ["1", ". a", "bc", "\n2", ".", " de", "\n", "3", ". f"]
DOMINANT = [0, 0, 1, 0, 0, 1, 1, 0, 2]  # sub-answers: tokens 0-2, 3-6, 7-8


def routing_for(dominant_n, seed=0) -> dict[str, Routing]:
    """2 layers x 2 projections of top-2 routing whose mean over all four makes `dominant_n[t]`
    token t's dominant adapter, while layer 1's up_proj alone prefers another one (so the mean
    really decides)."""
    rng = np.random.default_rng(seed)
    n = len(dominant_n)
    ids = np.stack([dominant_n, (np.asarray(dominant_n) + 1) % len(NAMES)], -1)[None].astype(np.int32)
    top = rng.uniform(0.6, 0.9, (1, n, 1))
    weights = np.concatenate([top, 1 - top], -1).astype(np.float32)
    routing = {}
    for layer in range(2):
        for proj in ("q_proj", "up_proj"):
            w = weights[..., ::-1] if (layer, proj) == (1, "up_proj") else weights
            routing[f"layers.{layer}.{proj}"] = Routing(ids=ids, weights=np.ascontiguousarray(w))
    return routing


def weights_for(dominant_n) -> np.ndarray:
    weights_nl = viz.adapter_weights(routing_for(dominant_n), len(NAMES))[0]
    np.testing.assert_array_equal(viz.dominant_adapters(weights_nl), dominant_n)
    return weights_nl


def test_lines_are_found_as_the_scorer_parses_them():
    text = "Sure:\r\n 1. a\x0c2.\n10. x\n1. again\r3.  c  "
    assert [a for _, a in composite_lines(text, 3)] == parse_composite(text, 3) == ["a", "", "c"]
    assert [text[start] for start, _ in composite_lines(text, 3)] == ["1", "2", "3"]


def test_sub_answer_spans_follow_the_character_offsets():
    assert answer_spans(PIECES, 3) == [(0, 3), (3, 7), (7, 9)]
    # a preamble is nobody's; lines out of order; a missing line; a line sharing its token with the next
    assert answer_spans(["Sure", "!\n", "2", ". b", "\n1", ". a"], 3) == [(4, 6), (2, 4), None]
    assert answer_spans(["1.\n2", ". b"], 2) == [None, (0, 2)]
    assert answer_spans([], 2) == [None, None]


def test_a_hand_built_trace_gives_the_exact_accuracy_and_lags():
    subs = answer_switch(PIECES, weights_for(DOMINANT), NAMES, NAMES)
    assert subs == [
        {"subtask": "alpha", "tokens": 3, "right": 2, "accuracy": 2 / 3, "lag": 0, "mostly": "alpha"},
        {"subtask": "beta", "tokens": 4, "right": 2, "accuracy": 0.5, "lag": 2, "mostly": "alpha"},
        {"subtask": "gamma", "tokens": 2, "right": 1, "accuracy": 0.5, "lag": 1, "mostly": "alpha"},
    ]
    never = answer_switch(PIECES, weights_for([0, 0, 1, 0, 0, 0, 2, 0, 1]), NAMES, NAMES)
    assert [x["lag"] for x in never] == [0, 4, 2] and [x["right"] for x in never] == [2, 0, 0]
    summary = summarize_switch([subs, never, None])
    assert summary["accuracy"] == pytest.approx((2 + 2 + 1 + 2) / 18)
    assert summary["median_lag"] == 1.5 and summary["mean_lag"] == pytest.approx(9 / 6)
    assert summary["sub_answers"] == 6 and summary["missing_lines"] == 0 and summary["no_adapter"] == []
    assert summary["subtasks"]["beta"] == {"accuracy": 2 / 8, "median_lag": 3.0, "sub_answers": 2}


def test_missing_lines_unrouted_tokens_and_subtasks_without_an_adapter_are_left_out():
    pieces = ["1", ". x", "\n", "3", ". y"]
    weights_nl = weights_for([0, 0, 0, 2, 2])
    weights_nl[3] = 0.0  # a token no adapter routed dominates nothing: never right
    subs = answer_switch(pieces, weights_nl, ("alpha", "beta", "delta"), NAMES)
    assert subs[0]["accuracy"] == 1.0 and subs[1] == {"subtask": "beta", "left_out": NO_LINE}
    assert subs[2] == {"subtask": "delta", "left_out": NO_ADAPTER}
    nothing = answer_switch(["no numbers here"], weights_for([1]), NAMES, NAMES)
    summary = summarize_switch([subs, nothing])
    assert (
        summary["sub_answers"] == 1 and summary["missing_lines"] == 4 and summary["no_adapter"] == ["delta"]
    )
    assert set(summary["subtasks"]) == {"alpha", "beta", "gamma"}
    assert summary["subtasks"]["gamma"] == {"accuracy": None, "median_lag": None, "sub_answers": 0}
    unrouted = answer_switch(["1", ". x"], np.zeros((2, 3)), ("gamma", "beta"), NAMES)
    assert unrouted[0]["lag"] == 2 and unrouted[0]["right"] == 0 and unrouted[0]["mostly"] is None
    only_missing = summarize_switch([nothing])
    assert only_missing["accuracy"] is None and only_missing["median_lag"] is None
    with pytest.raises(ValueError, match="2 token pieces but routing weights for 1"):
        answer_switch(["1", "."], weights_for([0]), NAMES, NAMES)


def test_answers_without_routing_have_no_switch_figures():
    registry = load_registry()
    item = EvalItem("composite-3", "p", "a@@@@\nb@@@@\nc", NAMES, ("a", "b", "c"))
    plain = Answer(item, "merged", "1. a\n2. b\n3. c")
    assert summarize_switch([None, None]) is None
    assert "switch" not in composite_scores([plain], registry, NAMES)["composite-3"]
    assert "switch" not in answer_record(plain, registry, NAMES)
    routed = Answer(
        item, "meteora", "1. abc\n2. de\n3. f", GeneratedRouting(tuple(PIECES), weights_for(DOMINANT))
    )
    scores = composite_scores([routed, plain], registry, NAMES)["composite-3"]
    assert scores["switch"]["sub_answers"] == 3 and scores["switch"]["accuracy"] == pytest.approx(5 / 9)
    record = answer_record(routed, registry, NAMES)
    assert [x["lag"] for x in record["switch"]] == [0, 2, 1]


def test_the_report_shows_the_switch_figures():
    subs = answer_switch(PIECES, weights_for(DOMINANT), ("alpha", "beta", "delta"), NAMES)
    switch = summarize_switch([subs, answer_switch(["x"], weights_for([0]), NAMES, NAMES)])
    settings = {"modes": ["meteora"], "adapters": list(NAMES), "max_new_tokens": 9, "prompts": 2}
    composite = {
        "meteora": {"composite-3": {"samples": 2, "fully_correct": 0.5, "subtasks": {}, "switch": switch}}
    }
    report = report_markdown(
        {"settings": {**settings, "routing_temperature": None}, "tasks": {}, "composite": composite}
    )
    assert "Adapter switching (meteora): 0.571 of the tokens of 2 sub-answers" in report
    assert "median 1, mean 1.00" in report and "| beta | 0.500 | 2 | 1 |" in report
    assert "3 sub-answers had no numbered line" in report and "no adapter of that name): delta" in report
