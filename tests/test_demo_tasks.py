"""The synthetic tasks: answers hand-checked, samples deterministic for a seed."""

from __future__ import annotations

import numpy as np

from meteora_jax.demo.tasks import COPY_CHARACTERS, TASKS, task_samples


def test_answers():
    cases = {
        "reverse": ("abc", "cba"),
        "upper": ("abj", "ABJ"),
        "double": ("ab", "abab"),
        "sort": ("cabca", "aabcc"),
        "count": ("a in abcaa", "3"),
        "add": ("12 30", "42"),
        "shift": ("abj", "bca"),
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
