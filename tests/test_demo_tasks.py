"""The synthetic tasks: answers hand-checked, samples deterministic for a seed."""

from __future__ import annotations

import numpy as np

from meteora_jax.data.composite import answer_text, composite_text
from meteora_jax.data.prompts import format_prompt
from meteora_jax.demo.tasks import (
    COPY_CHARACTERS,
    TASKS,
    composite_copy_samples,
    labelled_composite_samples,
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


def test_composite_copy_samples_are_answered_as_numbered_lines():
    for s in composite_copy_samples(20, np.random.default_rng(0)):
        questions = [q for q in s["prompt"].split("\n") if q.startswith("copy: ")][-3:]
        lines = s["response"].split("\n")
        assert 2 <= len(lines) <= 3 and lines == [
            f"{i}. {q[6:]}" for i, q in enumerate(questions[-len(lines) :], 1)
        ]


def test_labelled_composites_label_each_sub_task_and_switch_at_its_start():
    """The segments join to the formatted composite prompt plus its numbered answer; every
    question and answer line carries its own task, and template text the task that follows it."""
    tasks = ("reverse", "upper", "sort", "shift")
    for sample in labelled_composite_samples(tasks, 10, np.random.default_rng(1)):
        segments = sample["segments"]
        text = "".join(s["text"] for s in segments)
        prompt, answer = text.split(" [/INST]\n")
        questions = [q.strip() for q in prompt.split(":\n\n")[-1].split("\n\n")]
        names = [q.split(":")[0] for q in questions]
        assert len(set(names)) == 3 and set(names) <= set(tasks)
        answers = [TASKS[n].answer(q.split(": ")[1]) for n, q in zip(names, questions, strict=True)]
        assert answer == answer_text(answers)
        assert text.startswith(format_prompt("Example 1:")[: len("[INST] Example 1:")])
        for s in segments:
            words = s["text"].split(": ")
            if words[0] in TASKS:  # a question: its own task
                assert s["task"] == words[0]
            elif s["text"][:2] in ("1.", "2.", "3."):  # an answer line: its question's task
                assert s["task"] == names[int(s["text"][0]) - 1]
        assert segments[0]["task"] == names[0] and segments[-1]["task"] == names[-1]
        assert text == format_prompt(composite_text(_shots(segments), questions)) + answer_text(answers)


def _shots(segments):
    """The two few-shot examples of a labelled composite, read back from its segments."""
    text = "".join(s["text"] for s in segments)
    shots = []
    for block in text.split("Example ")[1:]:
        body = block.split(":\n\n", 1)[1].split("\n\n\n")[0]
        asked, answered = body.rsplit("\n\n", 1)
        prompts = asked.split("\n\n")
        shots.append([(p, a.split(". ", 1)[1]) for p, a in zip(prompts, answered.split("\n"), strict=True)])
    return shots
