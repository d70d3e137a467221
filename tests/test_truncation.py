"""Samples longer than --seq-len are found before a run starts: a sample left without its response
or a task cut more than half is refused, naming the file and the --seq-len that fits, before
--out is touched; fewer cuts get one warning; the tiny setup trains with neither."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest

from meteora_jax.cli import main
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.prompts import load_tokenizer
from meteora_jax.data.samples import encode_sample
from meteora_jax.data.tasks import load_tasks
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.errors import ConfigError
from meteora_jax.training.adapters import LoRASpec, lora_train_config, train_lora
from meteora_jax.training.gates import RunSpec, train
from meteora_jax.training.train_config import TrainConfig
from meteora_jax.training.truncation import FileCuts, check_truncation, count_cuts

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character, BOS in front, EOS id 2: lengths by hand. A prompt p is
    "[INST] p [/INST]\\n" (16 + len(p) characters) + BOS; a response r is len(r) + EOS."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}


def _write(root, task: str, lines: list[dict]) -> str:
    os.makedirs(os.path.join(root, task), exist_ok=True)
    path = os.path.join(root, task, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def _qa(prompt_chars: int, response_chars: int) -> dict:
    return {"prompt": "q" * prompt_chars, "response": "r" * response_chars}


@pytest.fixture
def by_hand(tmp_path):
    """Task a: samples of 29, 34 (its prompt alone 32), 20 and 22 tokens; task b: one prompt of
    20 tokens and two segments samples of 1 + 40 + 1 = 42 tokens."""
    a = _write(tmp_path, "a", [_qa(1, 10), _qa(15, 1), _qa(1, 1), _qa(1, 3)])
    segments = {"segments": [{"task": "a", "text": "x" * 20}, {"task": "b", "text": "y" * 20}]}
    b = _write(tmp_path, "b", [_qa(1, 1), segments, segments])
    return load_tasks(tmp_path, ["a", "b"]), a, b


def test_counts_by_hand(by_hand):
    tasks, a, b = by_hand
    assert count_cuts(tasks, CharTokenizer(), 33) == [FileCuts(a, 4, 1, 0, 34), FileCuts(b, 3, 2, 0, 42)]
    # at 32 the second sample of a keeps its prompt only; a segments sample has no prompt
    assert count_cuts(tasks, CharTokenizer(), 32) == [FileCuts(a, 4, 1, 1, 34), FileCuts(b, 3, 2, 0, 42)]
    assert count_cuts(tasks, CharTokenizer(), 42) == [FileCuts(a, 4, 0, 0, 34), FileCuts(b, 3, 0, 0, 42)]


def test_a_sample_left_without_response_or_most_of_a_task_cut_is_refused(by_hand, capsys):
    tasks, a, b = by_hand
    with pytest.raises(ConfigError) as refused:
        check_truncation({"a": tasks["a"]}, CharTokenizer(), 32, command="train-gate")
    assert str(refused.value) == (
        f"--seq-len 32 would cut the training samples so that they train little or nothing: {a}: 1 of 4 "
        "samples are longer (the longest has 34 tokens), 1 of them keep no response token (the prompt "
        "fills the row); --seq-len 34 fits every sample"
    )
    with pytest.raises(ConfigError, match=rf"{b}: 2 of 3 samples are longer .* --seq-len 42 fits every"):
        check_truncation(
            tasks, CharTokenizer(), 33, command="train-gate"
        )  # a alone would only be warned about
    assert capsys.readouterr().err == ""  # a refusal warns about nothing


def test_fewer_cuts_warn_once_naming_the_counts(by_hand, capsys):
    tasks, a, _ = by_hand
    with pytest.warns(UserWarning) as caught:
        check_truncation({"a": tasks["a"]}, CharTokenizer(), 33, command="train-lora")
    want = (
        f"--seq-len 33 cuts 1 training samples, which lose the end of their response: {a} 1 of 4 "
        "(longest 34 tokens); --seq-len 34 fits every sample"
    )
    assert [str(w.message) for w in caught] == [want]
    assert capsys.readouterr().err == f"meteora-jax train-lora: WARNING: {want}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_truncation({"a": tasks["a"]}, CharTokenizer(), 34, command="train-gate")  # nothing cut: silent


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def longest(setup) -> int:
    """The tokens of the tiny setup's longest training sample (encoded as training does)."""
    tokenizer = load_tokenizer(setup.base)
    tasks = load_tasks(setup.data, list(setup.adapters))
    return max(len(encode_sample(tokenizer, s)["input_ids"]) for t in tasks.values() for s in t)


def _train_gate_args(setup, out, seq_len: int, *extra) -> list[str]:
    args = ["train-gate", "--base", setup.base, "--data", setup.data, "--out", os.fspath(out)]
    for name, folder in setup.adapters.items():
        args += ["--adapter", f"{name}={folder}"]
    return [*args, "--steps", "1", "--seq-len", str(seq_len), "--batch-size", "8", "--no-progress", *extra]


def test_train_gate_below_the_prompts_is_refused_before_out_is_touched(setup, longest, tmp_path, capsys):
    """--seq-len 8 is shorter than every prompt: exit 2, one line naming a task file and the
    --seq-len that fits; no --out is created, and --force leaves a foreign folder as it was."""
    out = tmp_path / "run"
    assert main(_train_gate_args(setup, out, 8)) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteora-jax train-gate: error: --seq-len 8 would cut") and err.count("\n") == 1
    reverse = os.path.join(setup.data, "reverse", "train.jsonl")
    assert re.search(
        rf"{re.escape(reverse)}: 64 of 64 samples are longer .*, \d+ of them keep no response token", err
    )
    assert err.rstrip().endswith(f"--seq-len {longest} fits every sample")
    assert not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(_train_gate_args(setup, foreign, 8, "--force")) == 2
    assert "--seq-len 8 would cut" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


def test_train_lora_below_the_prompts_is_refused_before_out_is_touched(setup, tmp_path, capsys):
    out = tmp_path / "adapter"
    task = os.path.join(setup.data, "upper")
    args = ["train-lora", "--base", setup.base, "--data", task, "--out", os.fspath(out), "--steps", "1"]
    assert main([*args, "--seq-len", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteora-jax train-lora: error: --seq-len 8 would cut") and err.count("\n") == 1
    assert f"{os.path.join(task, 'train.jsonl')}: 64 of 64 samples are longer" in err
    assert not out.exists()


def test_the_python_entry_points_refuse_too(setup, tmp_path):
    data = DataConfig(seq_len=8, batch_size=8)
    gate_spec = RunSpec(
        setup.base, setup.adapters, setup.data, os.fspath(tmp_path / "gate"), TrainConfig(steps=1), data
    )
    with pytest.raises(ConfigError, match=r"reverse/train\.jsonl: 64 of 64 samples are longer"):
        train(gate_spec)
    lora_spec = LoRASpec(
        setup.base,
        os.path.join(setup.data, "double"),
        os.fspath(tmp_path / "lora"),
        lora_train_config(1),
        data,
    )
    with pytest.raises(ConfigError, match=r"double/train\.jsonl: 64 of 64 samples are longer"):
        train_lora(lora_spec)
    assert os.listdir(tmp_path) == []


def test_the_tiny_setup_trains_without_a_warning(setup, longest, tmp_path, capsys):
    assert longest < 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_train_gate_args(setup, tmp_path / "run", 64, "--mesh", "data=8,fsdp=1,tensor=1")) == 0
    assert not [w for w in caught if "--seq-len" in str(w.message)]
    assert "seq-len" not in capsys.readouterr().err
