"""`meteora-jax eval` end to end on a tiny model: every mode, composite prompts, the artefacts, the
modes' meaning checked against direct generation, scoring of known-right answers, the scoring
self-check, the composite layout and routing temperature, switch figures, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from matplotlib import image as mpimg

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.data.prompts import encode_prompt, format_prompt, load_tokenizer
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.evaluation.eval_run import check_scoring
from meteora_jax.evaluation.registry import load_registry
from meteora_jax.evaluation.report import report_markdown
from meteora_jax.evaluation.runner import UNIFORM_TEMPERATURE, Answer, EvalItem, answer_by_line, mode_routing
from meteora_jax.evaluation.scoring import composite_scores, task_scores
from meteora_jax.text import generate_texts, generated_routing, stop_ids

pytestmark = pytest.mark.filterwarnings("ignore:no gates given")
MODES = ["meteora", "adapter", "base", "merged"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")), init_std=0.1, train=16, test=6)


def _args(setup, out, *extra) -> list[str]:
    args = ["eval", "--base", setup.base, "--tasks", setup.data, "--out", os.fspath(out), "--no-progress"]
    for name, folder in setup.adapters.items():
        args += ["--adapter", f"{name}={folder}"]
    return [*args, "--max-new-tokens", "8", "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    args = _args(setup, out, "--mode", *MODES, "--composite-n", "3", "--composite-samples", "3")
    assert main(args) == 0
    return out


def _predictions(out) -> list[dict]:
    with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_eval_writes_every_artefact(evaluated, setup):
    """results.json (every task x mode; composite per sub-task and fully-correct rate, for every
    mode), report.md, predictions.jsonl (one line per answer) and the routing view."""
    results = json.loads((evaluated / "results.json").read_text())
    tasks = sorted(setup.adapters)
    assert set(results["tasks"]) == set(MODES)
    for mode in MODES:
        assert sorted(results["tasks"][mode]) == tasks
        assert all(results["tasks"][mode][t]["samples"] == 6 for t in tasks)
    assert sorted(results["composite"]) == sorted(MODES)
    composite = results["composite"]["meteora"]["composite-3"]
    assert composite["samples"] == 3 and 0.0 <= composite["fully_correct"] <= 1.0
    assert sorted(composite["subtasks"]) == tasks
    lines = _predictions(evaluated)
    assert len(lines) == 4 * 3 * 6 + 4 * 3
    assert {line["mode"] for line in lines} == set(MODES)
    first_composite = next(line for line in lines if line["task"] == "composite-3")
    assert len(first_composite["answers"]) == 3 and "right" in first_composite
    report = (evaluated / "report.md").read_text()
    assert "| task | metric | meteora | adapter | base | merged |" in report and "## composite-3" in report
    assert "<html" in (evaluated / "routing.html").read_text().lower()
    assert mpimg.imread(evaluated / "routing.png").shape[1] == 960  # README width, legible


def test_gold_answers_self_check_and_switch_figures_are_recorded(evaluated, setup):
    """On the task folder every gold answer scores 1.0 (said in the report); the meteora mode's
    composite answers carry switch figures, per answer and aggregated; other modes do not."""
    results = json.loads((evaluated / "results.json").read_text())
    assert results["self_check"] == {**dict.fromkeys(setup.adapters, 1.0), "composite-3": 1.0}
    report = (evaluated / "report.md").read_text()
    assert "Scoring self-check: gold answers score 1.0 for every task and composite" in report
    s = results["settings"]
    assert s["composite_layout"] == "reference" and s["composite_routing_temperature"] is None
    switch = results["composite"]["meteora"]["composite-3"]["switch"]
    assert set(switch) >= {"accuracy", "median_lag", "mean_lag", "sub_answers", "subtasks"}
    lines = [x for x in _predictions(evaluated) if x["task"] == "composite-3"]
    judged = [sub for x in lines if x["mode"] == "meteora" for sub in x["switch"] if "left_out" not in sub]
    assert switch["sub_answers"] == len(judged)
    assert all("switch" not in x for x in lines if x["mode"] != "meteora")
    assert all("switch" not in results["composite"][m]["composite-3"] for m in ("base", "merged"))
    assert "Adapter switching (meteora)" in report
    if judged:
        right = sum(sub["right"] for sub in judged) / sum(sub["tokens"] for sub in judged)
        assert switch["accuracy"] == pytest.approx(right)


def test_generated_routing_covers_the_response_tokens(setup):
    """Per row: one display piece and one (L,) weight row per generated token, EOS left out; the
    pieces spell the response; every token routed (weights summing to 1)."""
    fused = mj.load_model(setup.base, adapters=setup.adapters)
    tokenizer = load_tokenizer(setup.base)
    prompts = [format_prompt(p) for p in ("upper: abc", "reverse: hgfedcba", "double: ij")]
    eos = stop_ids(fused, tokenizer)
    out, responses = generate_texts(fused, tokenizer, prompts, max_new_tokens=12, return_routing=True)
    rows = generated_routing(out, tokenizer, fused)
    for b, (row, response) in enumerate(zip(rows, responses, strict=True)):
        new = np.asarray(out.new_tokens)[b][: int(out.num_new_tokens[b])]
        assert len(row.pieces) == len(new) - int(new[-1] in eos)
        assert "".join(row.pieces) == response
        assert row.weights_nl.shape == (len(row.pieces), 3)
        np.testing.assert_allclose(row.weights_nl.sum(-1), 1.0, atol=1e-5)


def test_a_composite_with_a_multi_line_answer_fails_the_self_check():
    """A multi-line reference cannot be written as one numbered line: the composite is named
    below 1.0 (a warning, and a loud line in the report); single-task prompts stay at 1.0."""
    registry = load_registry()
    items = [
        EvalItem("gsm8k", "p", "Half of 8 is 4.\n#### 4"),
        EvalItem("winowhy", "p", " True\n"),
        EvalItem("composite-2", "p", "", ("winowhy", "upper"), ("True", "AB")),
        EvalItem("composite-2", "p", "", ("winowhy", "upper"), ("True", "AB\nCD")),
    ]
    with pytest.warns(UserWarning, match=r"below 1.0 for composite-2 \(0.500\)"):
        scores = check_scoring(items, registry)
    assert scores == {"gsm8k": 1.0, "winowhy": 1.0, "composite-2": 0.5}
    settings = {"modes": [], "adapters": [], "max_new_tokens": 1, "routing_temperature": None, "prompts": 4}
    report = report_markdown({"settings": settings, "self_check": scores, "tasks": {}, "composite": {}})
    assert (
        "WARNING: scoring self-check failed: gold answers score below 1.0 for composite-2 (0.500)" in report
    )


def test_composite_routing_temperature_rule():
    """Composite prompts in meteora mode: --composite-routing-temperature, else --routing-temperature,
    else the reference's for their n; single-task prompts ignore the composite one."""

    class Model:
        adapter_names = ("a", "b", "c")

    single, triple = (
        [EvalItem("a", "p", "r")],
        [EvalItem("composite-3", "p", "r", ("a", "b", "c"), ("", "", ""))],
    )
    assert mode_routing("meteora", Model, triple, None) == {"routing_temperature": 15.0}
    assert mode_routing("meteora", Model, triple, 2.0) == {"routing_temperature": 2.0}
    assert mode_routing("meteora", Model, triple, 2.0, composite_temperature=7.0) == {
        "routing_temperature": 7.0
    }
    assert mode_routing("meteora", Model, single, 2.0, composite_temperature=7.0) == {
        "routing_temperature": 2.0
    }
    assert mode_routing("meteora", Model, single, None, composite_temperature=7.0) == {
        "routing_temperature": None
    }


def test_numbered_layout_and_composite_temperature_flags(setup, tmp_path):
    """--composite-layout numbered builds numbered-question prompts; the composite routing
    temperature is recorded in results.json and report.md."""
    out = tmp_path / "out"
    args = _args(setup, out, "--limit", "1", "--composite-n", "3", "--composite-samples", "2")
    args += ["--composite-layout", "numbered", "--composite-routing-temperature", "2.5"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["composite_layout"] == "numbered"
    assert results["settings"]["composite_routing_temperature"] == 2.5
    assert "composite prompts (meteora mode): 2.5" in (out / "report.md").read_text()
    composite = [x for x in _predictions(out) if x["task"] == "composite-3"]
    assert (
        len(composite) == 1
        and composite[0]["prompt"].startswith("1. ")
        and "Example 1" not in composite[0]["prompt"]
    )
    assert "switch" in composite[0]


def test_modes_mean_what_they_say(evaluated, setup):
    """adapter = each row's own adapter forced; base = the model without adapters; merged = every
    adapter at weight exactly 1 / L."""
    lines = [x for x in _predictions(evaluated) if x["task"] == "upper"]
    tokenizer = load_tokenizer(setup.base)
    prompts = [format_prompt(x["prompt"]) for x in lines if x["mode"] == "base"]
    base_only = mj.load_model(setup.base)
    _, plain = generate_texts(base_only, tokenizer, prompts, max_new_tokens=8)
    assert [x["prediction"] for x in lines if x["mode"] == "base"] == [p.strip() for p in plain]
    fused = mj.load_model(setup.base, adapters=setup.adapters)
    upper = list(fused.adapter_names).index("upper")
    _, forced = generate_texts(
        fused, tokenizer, prompts, max_new_tokens=8, adapter_ids=[upper] * len(prompts)
    )
    assert [x["prediction"] for x in lines if x["mode"] == "adapter"] == [p.strip() for p in forced]
    composite = [x for x in _predictions(evaluated) if x["task"] == "composite-3" and x["mode"] == "adapter"]
    assert composite
    for x in composite:  # the oracle: each line by its own sub-task's adapter, after the lines before,
        lines, used = [], 0  # all lines within the one budget of 8 new tokens, line breaks included
        for task in (a["subtask"] for a in x["answers"]):
            if used >= 8:
                break
            text = format_prompt(x["prompt"]) + "".join(line + "\n" for line in lines)
            _, (line,) = generate_texts(
                fused, tokenizer, [text], max_new_tokens=8 - used,
                adapter_ids=[list(fused.adapter_names).index(task)],
            )  # fmt: skip
            lines.append(line.split("\n", 1)[0].rstrip())
            used += len(tokenizer(lines[-1], add_special_tokens=False)["input_ids"]) + 1
        assert x["prediction"] == "\n".join(lines).strip()
    ids = np.asarray([[1, 5, 9, 14, 3, 7]], np.int32)
    out = fused(ids, return_routing=True, top_k=3, temperature=UNIFORM_TEMPERATURE)
    for routing in out.routing.values():
        np.testing.assert_array_equal(np.asarray(routing.weights), np.float32(1 / 3))


def test_the_line_oracle_keeps_to_one_budget_and_the_positions(setup):
    """The line-at-a-time oracle writes at most max_new_tokens in all, as the routed modes do: a
    budget that fits the prompt once no longer runs a later line past the model's positions."""
    fused = mj.load_model(setup.base, adapters=setup.adapters)
    tokenizer = load_tokenizer(setup.base)
    names = list(fused.adapter_names)
    item = EvalItem("composite-3", "1. a\n2. b\n3. c", "", tuple(names[:3]), ("x", "y", "z"))
    prompt = len(encode_prompt(tokenizer, format_prompt(item.prompt)))
    budget = fused.config.max_position_embeddings - prompt  # fills the positions exactly
    (text,) = answer_by_line(fused, tokenizer, [item], budget, stop_ids(fused, tokenizer))
    written = sum(
        len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in text.split("\n")
    )
    assert 0 < written <= budget + 1  # the last line's break is counted but never written


def test_answers_equal_to_the_references_score_full_marks(evaluated, setup, tmp_path):
    """With test responses replaced by the base mode's own predictions, base mode scores 1.0 on
    every task (nothing lost between generation and scoring)."""
    tasks = tmp_path / "tasks"
    for line in _predictions(evaluated):
        if line["mode"] == "base" and line["task"] != "composite-3":
            folder = tasks / line["task"]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "test.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"prompt": line["prompt"], "response": line["prediction"]}) + "\n")
    args = _args(setup, tmp_path / "out", "--mode", "base")
    args[args.index("--tasks") + 1] = os.fspath(tasks)
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["base"]
    assert all(scores["exact_match"] == 1.0 for scores in results.values()), results


def test_composite_scoring_by_sub_task():
    """Each numbered answer is scored with its own sub-task's metric; a prompt is fully correct
    only when every answer is right; a missing number is an empty answer."""
    registry = load_registry()
    item = EvalItem("composite-2", "p", "4@@@@\nyes", ("gsm8k", "strategyqa"), ("#### 4", "Yes, because"))
    answers = [
        Answer(item, "meteora", "1. The answer is 4.\n2. yes it is"),
        Answer(item, "meteora", "2. no\n1. 4"),
        Answer(item, "meteora", "1. 5"),
    ]
    scores = composite_scores(answers, registry)["composite-2"]
    assert scores["samples"] == 3 and scores["fully_correct"] == pytest.approx(1 / 3)
    assert scores["subtasks"]["gsm8k"]["accuracy"] == pytest.approx(2 / 3)
    assert scores["subtasks"]["strategyqa"]["yes_no_accuracy"] == pytest.approx(1 / 3)
    single = [Answer(EvalItem("winowhy", "p", "True"), "base", " true ")]
    assert task_scores(single, registry) == {"winowhy": {"exact_match": 1.0, "samples": 1}}


def _bad(setup, tmp_path, capsys, *extra, tasks=None) -> str:
    out = tmp_path / "out"
    args = _args(setup, out, *extra)
    if tasks is not None:
        args[args.index("--tasks") + 1] = os.fspath(tasks)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteora-jax eval: error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    return err


def test_bad_input_is_named_and_nothing_is_written(setup, tmp_path, capsys):
    assert "--task nope: no folder" in _bad(setup, tmp_path, capsys, "--task", "nope")
    tasks = tmp_path / "tasks"
    shutil.copytree(setup.data, tasks)
    os.remove(tasks / "upper" / "test.jsonl")
    err = _bad(setup, tmp_path, capsys, "--task", "upper", tasks=tasks)
    assert "--task upper: " in err and "has no test split (test.jsonl)" in err
    composite = tmp_path / "c.jsonl"
    composite.write_text(json.dumps({"prompt": "p", "response": "a@@@@\nb", "answers": ["a", "b"]}) + "\n")
    err = _bad(setup, tmp_path, capsys, "--composite", os.fspath(composite))
    assert f"{composite} line 1" in err and "subtasks" in err
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"upper": {"metrics": ["exact", "perplexity"]}}))
    err = _bad(setup, tmp_path, capsys, "--metrics", os.fspath(metrics))
    assert os.fspath(metrics) in err and "upper" in err and "perplexity" in err
    renamed = tmp_path / "renamed"
    shutil.copytree(setup.data, renamed)
    os.rename(renamed / "upper", renamed / "capitals")
    err = _bad(setup, tmp_path, capsys, "--mode", "adapter", "--task", "capitals", tasks=renamed)
    assert "--mode adapter: task capitals has no adapter of that name" in err
    assert "n must be an integer >= 2" in _bad(setup, tmp_path, capsys, "--composite-n", "1")
    err = _bad(setup, tmp_path, capsys, "--composite-routing-temperature", "0")
    assert "--composite-routing-temperature must be a finite number > 0, got 0.0" in err
    inside = os.path.join(setup.data, "x")
    err = _bad(setup, tmp_path, capsys, "--out", inside)
    assert "--tasks" in err and not os.path.exists(inside)


def test_a_prompt_longer_than_the_model_is_named_before_any_generation(setup, tmp_path, capsys):
    """A 64 KB prompt in a test split: one line naming its file and line, before the model loads."""
    tasks = tmp_path / "tasks"
    shutil.copytree(setup.data, tasks)
    with open(tasks / "upper" / "test.jsonl", "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"prompt": "upper: " + "a" * 65536, "response": "A"}) + "\n")
    line = (tasks / "upper" / "test.jsonl").read_text().count("\n")
    err = _bad(setup, tmp_path, capsys, "--task", "upper", tasks=tasks)
    assert f"{tasks / 'upper' / 'test.jsonl'} line {line}: the prompt has" in err
    assert "more than the model's 256 (max_position_embeddings)" in err


def test_an_unknown_composite_layout_is_named_by_the_python_api(tmp_path):
    from meteora_jax.errors import ConfigError
    from meteora_jax.evaluation.eval_run import EvalSpec

    with pytest.raises(
        ConfigError, match="--composite-layout must be one of reference, numbered, got 'short'"
    ):
        EvalSpec(base="b", tasks_dir="t", out=os.fspath(tmp_path / "o"), composite_layout="short")
    assert not (tmp_path / "o").exists()
