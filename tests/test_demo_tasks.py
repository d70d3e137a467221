"""The synthetic tasks: answers hand-checked, samples deterministic for a seed."""

from __future__ import annotations

import numpy as np

from meteora_jax.data.composite import answer_text, composite_text
from meteora_jax.data.prompts import format_prompt
from meteora_jax.demo.synthetic import (
    COPY_CHARACTERS,
    PRETRAIN_TASKS,
    TASKS,
    labelled_composite_samples,
    numbered_task_samples,
    pretraining_keywords,
    pretraining_samples,
    sample_text,
    task_samples,
)


def test_answers():
    cases = {
        "reverse": ("abc", "cba"),
        "upper": ("abj", "ABJ"),
        "double": ("ab", "abab"),
        "sort": ("cabca", "aabcc"),
        "count": ("a in abcaa", "3"),
        "add": ("12 30", "42"),
        "shift": ("abj", "bca"),
        "rotate": ("abcd", "bcda"),
        "cipher": ("abij", "fjcd"),
    }
    assert set(cases) == set(TASKS)
    for task, (text, want) in cases.items():
        assert TASKS[task].answer(text) == want, task


def test_samples_are_seeded_and_say_the_task():
    a = task_samples("count", 20, np.random.default_rng(3))
    assert a == task_samples("count", 20, np.random.default_rng(3))
    assert a != task_samples("count", 20, np.random.default_rng(4))
    for s in a:
        assert s["prompt"].startswith("count: ") and s["response"] == TASKS["count"].answer(s["prompt"][7:])
    copies = task_samples("copy", 200, np.random.default_rng(0))
    assert all(s["prompt"] == f"copy: {s['response']}" for s in copies)
    assert set("".join(s["response"] for s in copies)) == set(COPY_CHARACTERS)


def test_no_task_input_is_its_own_answer():
    """Inputs a task leaves unchanged (a palindrome to reverse, a sorted word to sort) are drawn
    again, so a base that copies scores 0 on every task."""
    for task in TASKS:
        for s in task_samples(task, 300, np.random.default_rng(0)):
            assert s["response"] != s["prompt"].split(": ", 1)[1], task


def test_numbered_samples_ask_and_answer_in_numbered_lines():
    for s in numbered_task_samples("sort", 30, np.random.default_rng(2)):
        questions = s["prompt"].split("\n")
        assert 2 <= len(questions) <= 5
        words = [q.split(". sort: ")[1] for q in questions]
        assert questions == [f"{i}. sort: {w}" for i, w in enumerate(words, 1)]
        assert s["response"] == answer_text(["".join(sorted(w)) for w in words])


def test_pretraining_samples_answer_each_keyword_in_both_formats():
    """One-question and numbered samples; a share of the questions are the tasks', every token
    labelled with its question's keyword (the readout's classes), answers right."""
    tasks = ("upper", "sort")
    keywords = pretraining_keywords(tasks)
    assert keywords == ("copy", "lower", "upper", "sort")
    samples = pretraining_samples(400, np.random.default_rng(0), tasks=tasks, task_share=0.3, numbered=0.5)
    numbered = [s for s in samples if s.segments is not None]
    assert 150 < len(numbered) < 250
    asked = []
    for s in samples:
        text = sample_text(s)
        prompt, response = text.removeprefix("[INST] ").split(" [/INST]\n")
        questions = prompt.split("\n")
        pairs = [q.split(". ", 1)[-1].split(": ", 1) for q in questions]
        spec = {**PRETRAIN_TASKS, **TASKS}
        answers = [spec[k].answer(t) for k, t in pairs]
        assert response == (answer_text(answers) if s.segments is not None else answers[0])
        asked += [k for k, _ in pairs]
        if s.segments is None:
            assert keywords[s.label] == pairs[0][0]
        else:  # each answer line carries its own question's label
            lines = [
                (label, t) for label, t in s.segments if t.startswith(tuple(f"{i}. " for i in range(1, 6)))
            ]
            answer_lines = lines[len(questions) :]
            assert [keywords[label] for label, _ in answer_lines] == [k for k, _ in pairs]
    share = np.mean([k in tasks for k in asked])
    assert 0.25 < share < 0.35 and set(asked) == set(keywords)
    plain = pretraining_samples(50, np.random.default_rng(0))
    assert {keywords[s.label] for s in plain} <= set(PRETRAIN_TASKS)  # no tasks: copy and lower only


def test_labelled_composites_label_each_sub_task_and_switch_at_its_start():
    """The segments join to the formatted numbered composite prompt plus its numbered answer;
    every question and answer line carries its own task, and template text the task that
    follows it."""
    tasks = ("reverse", "upper", "sort", "shift")
    for sample in labelled_composite_samples(tasks, 10, np.random.default_rng(1), counts=(3,)):
        segments = sample["segments"]
        text = "".join(s["text"] for s in segments)
        prompt, answer = text.split(" [/INST]\n")
        questions = [q.split(". ", 1)[1] for q in prompt.removeprefix("[INST] ").split("\n")]
        names = [q.split(":")[0] for q in questions]
        assert len(set(names)) == 3 and set(names) <= set(tasks)
        answers = [TASKS[n].answer(q.split(": ")[1]) for n, q in zip(names, questions, strict=True)]
        assert answer == answer_text(answers)
        assert text == format_prompt(composite_text([], questions, layout="numbered")) + answer_text(answers)
        for s in segments:
            line = s["text"].removeprefix("[INST] ")
            if line[:2] in ("1.", "2.", "3."):  # a question or an answer line: its question's task
                assert s["task"] == names[int(line[0]) - 1]
        assert segments[0]["task"] == names[0] and segments[-1]["task"] == names[-1]
