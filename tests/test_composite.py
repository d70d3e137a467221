"""Composite-n prompts: the exact layout, the reference presets, seeded draws, the file round trip,
every refused input, and the `make-composite` command (nothing written when it refuses)."""

import argparse
import dataclasses
import json
import os
import re

import pytest

from meteora_jax.commands import add_command, make_composite, run_reporting
from meteora_jax.data import composite
from meteora_jax.data.composite import PRESETS, build_composite, read_composite, write_composite
from meteora_jax.errors import ConfigError, MissingFileError, OutputExistsError, OutputPathError
from meteora_jax.evaluation.eval_run import EvalSpec, composite_items
from meteora_jax.evaluation.runner import EvalSettings


def write_split(root, task, split, pairs):
    """Writes TASKS/<task>/<split>.jsonl; (prompt, response) pairs JSON-encoded, strings as they are."""
    os.makedirs(os.path.join(root, task), exist_ok=True)
    path = os.path.join(root, task, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(
                (pair if isinstance(pair, str) else json.dumps({"prompt": pair[0], "response": pair[1]}))
                + "\n"
            )
    return path


def write_task(root, task, train=5, test=6):
    """A task with `train` / `test` numbered samples (one train answer spans two lines)."""
    write_split(
        root,
        task,
        "train",
        [(f"{task} train {i}?", f"{task} a{i}" + "\nmore" * (i == 1)) for i in range(train)],
    )
    write_split(root, task, "test", [(f"{task} test {i}?", f"{task} r{i}") for i in range(test)])


@pytest.fixture
def three(tmp_path):
    """The composite-3 preset's folders, two train and one test sample each, plus a folder that is
    not a task (no test split) and an extra task (so n=3 must pick the preset, not draw)."""
    root = str(tmp_path / "tasks")
    write_split(
        root,
        "logical_deduction",
        "train",
        [("Order: A before B. First?", "A"), ("Order: C before D. Last?", "D")],
    )
    write_split(root, "logical_deduction", "test", [("Order: E before F. First?", "E")])
    qs_train = [
        ("Answer: Paris. Pick the question.", "What is the capital of France?"),
        ("Answer: 4. Pick the question.", "What is 2 + 2?"),
    ]
    write_split(root, "question_selection", "train", qs_train)
    write_split(
        root, "question_selection", "test", [("Answer: blue. Pick the question.", "What colour is the sky?")]
    )
    write_split(
        root,
        "strategyqa",
        "train",
        [("Q: Is ice cold?\nA:", "Yes. Ice is frozen water."), ("Q: Can fish fly?\nA:", " No. ")],
    )
    write_split(root, "strategyqa", "test", [("Q: Is fire hot?\nA:", "Yes.")])
    write_split(root, "no_test_split", "train", [("x", "y"), ("x", "y")])
    write_task(root, "winowhy")
    return root


EXPECTED_COMPOSITE_3 = (
    "Example 1:\n\n"
    "Order: A before B. First?\n\n"
    "Answer: Paris. Pick the question.\n\n"
    "Q: Is ice cold?\nA:\n\n"
    "1. A\n2. What is the capital of France?\n3. Yes. Ice is frozen water.\n\n\n"
    "Example 2:\n\n"
    "Order: C before D. Last?\n\n"
    "Answer: 4. Pick the question.\n\n"
    "Q: Can fish fly?\nA:\n\n"
    "1. D\n2. What is 2 + 2?\n3. No.\n\n\n"
    "Following the example above, generate answers to the questions below:\n\n"
    "Order: E before F. First?\n\n"
    "Answer: blue. Pick the question.\n\n"
    "Q: Is fire hot?\nA:\n"
)


def test_composite_3_layout_response_and_answers(three):
    (line,) = build_composite(three, n=3, samples=1)
    assert line["prompt"] == EXPECTED_COMPOSITE_3
    assert line["response"] == "E@@@@\nWhat colour is the sky?@@@@\nYes."
    assert line["answers"] == ["E", "What colour is the sky?", "Yes."]
    assert line["subtasks"] == ["logical_deduction", "question_selection", "strategyqa"]
    assert sorted(line) == sorted(composite.LINE_KEYS)
    assert "[INST]" not in line["prompt"]  # the caller wraps it with format_prompt


def test_numbered_layout_asks_numbered_questions_without_examples(three, tmp_path):
    """The compact layout: no few-shot prefix (so no train split is read) and the questions as
    numbered lines; the response and answers are the reference layout's."""
    (line,) = build_composite(three, n=3, samples=1, layout="numbered")
    assert line["prompt"] == (
        "1. Order: E before F. First?\n2. Answer: blue. Pick the question.\n3. Q: Is fire hot?\nA:"
    )
    assert line["answers"] == ["E", "What colour is the sky?", "Yes."]
    os.remove(os.path.join(three, "strategyqa", "train.jsonl"))
    write_split(three, "strategyqa", "train", [])
    assert build_composite(three, n=3, samples=1, layout="numbered") == [line]
    with pytest.raises(ConfigError, match="layout must be one of reference, numbered, got 'short'"):
        build_composite(three, n=3, samples=1, layout="short")
    out = tmp_path / "numbered.jsonl"
    assert command("--tasks", three, "--n", 3, "--samples", 1, "--layout", "numbered", "--out", out) == 0
    assert read_composite(out) == [line]


def test_labelled_numbered_segments_carry_each_line_s_task():
    segments = composite.labelled_segments([], ["a: x", "b: y"], ["X", "Y"], ["ta", "tb"], layout="numbered")
    assert "".join(s["text"] for s in segments) == "[INST] 1. a: x\n2. b: y [/INST]\n1. X\n2. Y"
    assert [(s["task"], s["text"]) for s in segments] == [
        ("ta", "[INST] "),
        ("ta", "1. a: x\n"),
        ("tb", "2. b: y"),
        ("ta", " [/INST]\n"),
        ("ta", "1. X\n"),
        ("tb", "2. Y"),
    ]


@pytest.fixture
def four(tmp_path):
    root = str(tmp_path / "tasks")
    for task in ("t0", "t1", "t2", "t3"):
        write_task(root, task)
    return root


def test_same_seed_same_lines_other_seed_other_lines(four):
    first = build_composite(four, n=3, samples=4, seed=7)
    assert first == build_composite(four, n=3, samples=4, seed=7)
    assert first != build_composite(four, n=3, samples=4, seed=8)
    assert len(first) == 4 and len({line["prompt"].split(composite.INSTRUCTION)[0] for line in first}) == 1


def test_drawn_subtasks_and_test_items_without_replacement(four):
    lines = build_composite(four, n=3, samples=6, seed=1)
    names = lines[0]["subtasks"]
    assert len(set(names)) == 3 and set(names) <= {"t0", "t1", "t2", "t3"}
    assert all(line["subtasks"] == names for line in lines)
    for k, task in enumerate(names):  # every test sample used exactly once
        assert sorted(line["answers"][k] for line in lines) == [f"{task} r{i}" for i in range(6)]
    drawn = {tuple(build_composite(four, n=3, samples=1, seed=s)[0]["subtasks"]) for s in range(6)}
    assert len(drawn) > 1


def test_examples_prefer_one_line_answers(four):
    for seed in range(8):
        (line,) = build_composite(four, subtasks=["t1", "t0"], samples=1, seed=seed)
        prefix = line["prompt"].split(composite.INSTRUCTION)[0]
        assert "\nmore" not in prefix
        assert line["subtasks"] == ["t1", "t0"]  # the given order is the prompt's order


def test_presets_are_picked_when_their_folders_exist(tmp_path):
    root = str(tmp_path / "tasks")
    for task in sorted(PRESETS["composite-10"]):
        write_task(root, task, train=2, test=2)
    for name, preset in PRESETS.items():
        (line,) = build_composite(root, n=len(preset), samples=1)
        assert tuple(line["subtasks"]) == preset, name
    settings = composite.CompositeSettings(n=4)
    names, how = composite.resolve_subtasks(root, settings)
    assert how == "drawn" and len(names) == 4
    assert composite.resolve_subtasks(root, composite.CompositeSettings(n=5)) == (
        PRESETS["composite-5"],
        "preset composite-5",
    )


def test_round_trip_through_the_file(four, tmp_path):
    lines = build_composite(four, n=2, samples=3, seed=3)
    out = write_composite(lines, tmp_path / "out" / "c.jsonl", inputs=[("--tasks", four)])
    assert read_composite(out) == lines
    assert os.listdir(tmp_path / "out") == ["c.jsonl"]
    with pytest.raises(OutputExistsError, match="already exists"):
        write_composite(lines, out)
    write_composite(lines[:1], out, force=True)
    assert read_composite(out) == lines[:1]


def test_eval_limit_caps_each_composite_size_apart(four, tmp_path):
    """A file of composite-2 then composite-3 prompts under `--limit 2`: two of each, in file
    order, as the limit caps each task (cutting the file would drop composite-3 unseen)."""
    lines = build_composite(four, n=2, samples=3, seed=1) + build_composite(four, n=3, samples=3, seed=2)
    path = write_composite(lines, tmp_path / "c.jsonl")
    spec = EvalSpec(base="b", tasks_dir=four, out="o", composite=str(path), settings=EvalSettings(limit=2))
    items = composite_items(spec, [])
    assert [(i.task, i.prompt) for i in items] == [
        (f"composite-{len(x['subtasks'])}", x["prompt"]) for x in lines[:2] + lines[3:5]
    ]
    unlimited = dataclasses.replace(spec, settings=EvalSettings())
    assert len(composite_items(unlimited, [])) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=1), "n must be an integer >= 2"),
        (dict(), "give n"),
        (dict(n=3, subtasks=["t0", "t1"]), "n is 3 but subtasks names 2 tasks"),
        (dict(subtasks=["t0", "t0"]), "subtasks repeats t0"),
        (dict(subtasks="t0,t1"), "subtasks must be a list of task names"),
        (dict(n=2, samples=0), "samples must be an integer >= 1, got 0"),
        (dict(n=2, seed=1.5), "seed must be an integer"),
        (dict(n=5), r"holds 4 task folders with train.jsonl and test.jsonl \(t0, t1, t2, t3\); n=5 needs 5"),
        (
            dict(subtasks=["t0", "nope", "../t1"]),
            r"task nope: no folder .*nope; '../t1' is not a task folder",
        ),
        (
            dict(n=2, samples=7),
            r"task t\d: .*test.jsonl holds 6 prompt / response samples; 7 composite prompts",
        ),
    ],
)
def test_bad_settings(four, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_composite(four, **kwargs)


def test_bad_task_folders(four, tmp_path):
    write_split(four, "t2", "train", [("only one", "sample")])
    write_split(four, "t3", "test", [("q", "r")])
    with pytest.raises(
        ConfigError, match=r"t2/train.jsonl holds 1 prompt / response samples; the 2 few-shot"
    ) as e:
        build_composite(four, subtasks=["t2", "t3"], samples=2)
    assert "t3/test.jsonl holds 1" in str(e.value)  # every short task at once
    os.remove(os.path.join(four, "t1", "test.jsonl"))
    with pytest.raises(ConfigError, match=r"task t1: no test split .*t1/test.jsonl"):
        build_composite(four, subtasks=["t0", "t1"], samples=1)
    write_split(four, "t0", "test", [("q", "r"), '{"prompt": "q"'])
    with pytest.raises(ConfigError, match=r"t0/test.jsonl line 2: not valid JSON"):
        build_composite(four, subtasks=["t0", "t2"], samples=1)
    write_split(four, "t0", "test", [("q", "r"), ("  ", "r")])
    with pytest.raises(ConfigError, match=r't0/test.jsonl line 2: task t0: "prompt" is empty'):
        build_composite(four, subtasks=["t0", "t2"], samples=1)
    with pytest.raises(ConfigError, match="tasks dir .*missing does not exist"):
        build_composite(tmp_path / "missing", n=2)
    with pytest.raises(ConfigError, match=r"^subtasks in tasks dir .*: task logical_deduction: no folder"):
        build_composite(four, subtasks=PRESETS["composite-3"], samples=1)


def write_lines(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_read_composite_checks_every_line(tmp_path):
    good = {"prompt": "p", "response": "a@@@@\nb", "subtasks": ["x", "y"], "answers": ["a", "b"]}
    path = tmp_path / "c.jsonl"
    bad = [
        ({"prompt": "p", "response": "a@@@@\nb"}, "line 3: missing subtasks, answers"),
        ({**good, "answers": ["a"]}, r"line 3: 1 answers for 2 sub-tasks \(x, y\)"),
        ({**good, "response": "a\nb"}, "line 3: \"response\" is not the answers joined by '@@@@\\\\n'"),
        (
            {**good, "subtasks": ["x"], "answers": ["a"], "response": "a"},
            'line 3: "subtasks" must name 2 or more',
        ),
        ({**good, "subtasks": "x,y"}, 'line 3: "subtasks" must be a list of task names'),
        ({**good, "prompt": ""}, 'line 3: "prompt" must be a non-empty string'),
        ("[1, 2]", "line 3: expected an object"),
        ("{oops", "line 3: not valid JSON"),
    ]
    for record, message in bad:
        write_lines(path, [good, "", record])
        with pytest.raises(ConfigError, match=f"{path} {message}"):
            read_composite(path)
    write_lines(path, ["", " "])
    with pytest.raises(ConfigError, match="holds no composite prompts"):
        read_composite(path)
    with pytest.raises(MissingFileError, match="does not exist"):
        read_composite(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match="composite line 1: missing subtasks"):
        write_composite([{"prompt": "p", "response": "a"}], tmp_path / "w.jsonl")
    assert not os.path.exists(tmp_path / "w.jsonl")


def test_write_composite_refuses_paths(four, tmp_path):
    lines = build_composite(four, n=2, samples=1)
    with pytest.raises(OutputPathError, match=r"--out .* is inside --tasks"):
        write_composite(lines, os.path.join(four, "c.jsonl"), inputs=[("--tasks", four)], setting="--out")
    os.mkdir(tmp_path / "folder")
    with pytest.raises(ConfigError, match="is a folder"):
        write_composite(lines, tmp_path / "folder")
    with pytest.raises(ConfigError, match="no composite lines"):
        write_composite([], tmp_path / "x.jsonl")
    assert not os.path.exists(os.path.join(four, "c.jsonl")) and os.listdir(tmp_path / "folder") == []


# ----------------------------------------------------------------------------- the command


def command(*argv):
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(dest="command", required=True), make_composite)
    return run_reporting(parser.parse_args(["make-composite", *map(str, argv)]))


def test_command_writes_and_says_what(three, tmp_path, capsys):
    out = tmp_path / "c3.jsonl"
    assert command("--tasks", three, "--preset", "composite-3", "--samples", 1, "--out", out) == 0
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and said.startswith(
        f"wrote {out}: 1 composite-3 prompts over logical_deduction"
    )
    assert "(preset composite-3; seed 0)" in said
    assert read_composite(out) == build_composite(three, n=3, samples=1)
    assert command("--tasks", three, "--n", 2, "--samples", 1, "--seed", 4, "--out", out, "--force") == 0
    assert "(drawn; seed 4)" in capsys.readouterr().out
    assert (
        command(
            "--tasks",
            three,
            "--subtasks",
            "strategyqa, winowhy",
            "--n",
            2,
            "--samples",
            1,
            "--out",
            out,
            "--force",
        )
        == 0
    )
    assert read_composite(out)[0]["subtasks"] == ["strategyqa", "winowhy"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", 3, "--out", "{tasks}/c.jsonl"], r"--out .*c.jsonl is inside --tasks"),
        (["--n", 3, "--out", "{taken}"], "already exists"),
        (["--preset", "composite-3", "--n", 3, "--out", "{out}"], "--preset names the sub-tasks"),
        (["--out", "{out}"], "name the sub-tasks: pass --n N, --preset NAME or --subtasks a,b,c"),
        (["--n", 1, "--out", "{out}"], "n must be an integer >= 2"),
        (["--subtasks", "strategyqa,,winowhy", "--out", "{out}"], "an empty task name"),
        (["--preset", "composite-5", "--out", "{out}"], "task abstract_narrative_understanding: no folder"),
        (
            ["--n", 3, "--samples", 2, "--out", "{out}"],
            r"logical_deduction/test.jsonl holds 1 prompt / response",
        ),
        (["--n", 3, "--out", "{out}"], "holds 1 prompt / response samples; 200 composite prompts"),
    ],
)
def test_refused_commands_write_nothing(three, tmp_path, capsys, argv, message):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("old\n")
    paths = {"tasks": three, "taken": taken, "out": tmp_path / "c.jsonl"}
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(three))
    assert command("--tasks", three, *(str(a).format(**paths) for a in argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meteora-jax make-composite: error: ")
    assert re.search(message, err), err
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(three))) == before
    assert taken.read_text() == "old\n"
