"""Task files in the MeteoRA reference's layout (prompts stored already in the instruction
format) are read as they are: every command wraps such a prompt once, never twice."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from meteora_jax.cli import main
from meteora_jax.data.pipeline import DataConfig, train_batches
from meteora_jax.data.prompts import format_prompt, load_tokenizer
from meteora_jax.data.tasks import load_tasks, read_task_file
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.evaluation.runner import task_items


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The tiny setup's task folders as they are ("raw") and in the reference's layout."""
    root = tmp_path_factory.mktemp("layouts")
    setup = write_tiny_setup(os.fspath(root / "tiny"), train=16, test=4)
    wrapped = root / "wrapped"
    for task in os.listdir(setup.data):
        os.makedirs(wrapped / task)
        for split in ("train", "test"):
            lines = (root / "tiny" / "data" / task / f"{split}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            text = "".join(json.dumps({**r, "prompt": format_prompt(r["prompt"])}) + "\n" for r in records)
            (wrapped / task / f"{split}.jsonl").write_text(text)
    return setup, setup.data, os.fspath(wrapped)


def test_formatted_prompts_are_read_as_their_input_and_said_once(layouts):
    _, raw, wrapped = layouts
    path = os.path.join(wrapped, "upper", "train.jsonl")
    with pytest.warns(
        UserWarning, match=r"upper/train.jsonl: 16 of 16 prompts are already in the instruction format"
    ):
        ref = read_task_file(path, 0, ["upper"])
    plain = read_task_file(os.path.join(raw, "upper", "train.jsonl"), 0, ["upper"])
    assert [(s.prompt, s.response) for s in ref] == [(s.prompt, s.response) for s in plain]
    assert not any("[INST]" in s.prompt for s in ref)


@pytest.mark.filterwarnings("ignore:.*instruction format")
def test_every_command_reads_the_reference_layout_as_it_reads_raw_prompts(layouts, tmp_path):
    """What train-gate / train-lora train on (the batches), what eval asks and what make-composite
    writes are the same for both layouts; train-lora runs on the reference's layout end to end."""
    setup, raw, wrapped = layouts
    names = list(setup.adapters)
    config = DataConfig(seq_len=64, batch_size=8)
    tokenizer = load_tokenizer(setup.base)
    batches = [train_batches(load_tasks(data, names), tokenizer, config) for data in (raw, wrapped)]
    for _ in range(3):
        a, b = (next(it) for it in batches)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for it in batches:
        it.close()
    items = [task_items(data, names) for data in (raw, wrapped)]
    assert [[i.prompt for i in v] for v in items[0].values()] == [
        [i.prompt for i in v] for v in items[1].values()
    ]
    written = []
    for name, data in (("raw", raw), ("wrapped", wrapped)):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(["make-composite", "--tasks", data, "--n", "3", "--samples", "2", "--out", os.fspath(out)])
            == 0
        )
        written.append(out.read_text())
    assert written[0] == written[1]
    lora = ["train-lora", "--base", setup.base, "--data", os.path.join(wrapped, "upper"), "--rank", "2"]
    lora += ["--out", os.fspath(tmp_path / "lora"), "--steps", "1", "--seq-len", "64", "--batch-size", "8"]
    assert main([*lora, "--no-progress"]) == 0


def test_generate_reads_a_reference_prompt_file_as_it_reads_raw_prompts(layouts, tmp_path):
    """generate --prompts on a test split in the reference's layout wraps each prompt once: the
    answers equal those of the raw split; with --raw the prompts go in as written."""
    setup, raw, wrapped = layouts
    answers = []
    for name, data in (("raw", raw), ("wrapped", wrapped)):
        out = tmp_path / f"{name}.jsonl"
        args = ["generate", "--base", setup.base, "--prompts", os.path.join(data, "upper", "test.jsonl")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*args, "--max-new-tokens", "4", "--out", os.fspath(out)]) == 0
        said = [str(w.message) for w in caught if "instruction format" in str(w.message)]
        assert len(said) == (name == "wrapped")
        answers.append([json.loads(line)["response"] for line in out.read_text().splitlines()])
    assert answers[0] == answers[1]
    out = tmp_path / "as-written.jsonl"
    args = ["generate", "--base", setup.base, "--prompts", os.path.join(wrapped, "upper", "test.jsonl")]
    assert main([*args, "--raw", "--max-new-tokens", "4", "--out", os.fspath(out)]) == 0
    assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == answers[0]
