"""The demo base from nothing: task folders, a character-level tokenizer that writes every demo
text, a pre-trained HF base; the round-trip refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import meteora_jax as mj
from meteora_jax.data.prompts import check_round_trip, load_tokenizer, train_tiny_tokenizer
from meteora_jax.demo.pretrain import PretrainSettings
from meteora_jax.demo.setup import DEMO_TASKS, DemoBaseSettings, build_demo_base
from meteora_jax.errors import ConfigError


def test_build_demo_base_writes_tasks_and_a_loadable_pretrained_base(tmp_path):
    settings = DemoBaseSettings(
        train=8, numbered=4, test=4, pretrain_samples=64, layers=1, hidden=32,
        pretrain=PretrainSettings(steps=6, batch_size=8, seq_len=160, lr=1e-2),
    )  # fmt: skip
    built = build_demo_base(os.fspath(tmp_path), settings, progress=False)
    assert sorted(os.listdir(built.data)) == sorted(DEMO_TASKS)
    for task in DEMO_TASKS:
        lines = (tmp_path / "data" / task / "test.jsonl").read_text().splitlines()
        assert len(lines) == 4
    tokenizer = load_tokenizer(built.base)
    assert tokenizer.tokenize("abcdefghij") == list("abcdefghij")  # letters stay single tokens
    assert tokenizer.tokenize("[INST] shift: ab") == ["[INST]", "▁", "shift", ":", "▁", "a", "b"]
    for task in DEMO_TASKS:  # every text the demo trains on, numbered samples included, round-trips
        for line in (tmp_path / "data" / task / "train.jsonl").read_text().splitlines():
            sample = json.loads(line)
            check_round_trip(tokenizer, [sample["prompt"], sample["response"]], task)
    check_round_trip(tokenizer, ["Following the example above", "Example 1:\n\n1. cipher: cab"], "templates")
    model = mj.load_model(built.base)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tokenizer)
    assert len(built.pretrain_losses) == 6 and np.isfinite(built.pretrain_losses).all()


def test_labelled_composite_data_adds_segments_samples_to_the_train_splits(tmp_path):
    """The composite-trained gate variant's data: every task folder as it was, plus labelled
    composite prompts dealt round-robin into the train splits, which `load_tasks` reads."""
    from meteora_jax.data.tasks import load_tasks
    from meteora_jax.demo.setup import write_labelled_composite_data
    from meteora_jax.demo.synthetic import write_tasks

    data = os.fspath(tmp_path / "data")
    write_tasks(data, train=4, test=2, tasks=("reverse", "upper", "shift"))
    out = write_labelled_composite_data(data, os.fspath(tmp_path / "mixed"), samples=6, counts=(3,))
    tasks = load_tasks(out, ["reverse", "upper", "shift"], split="train")
    assert {name: len(samples) for name, samples in tasks.items()} == {"reverse": 6, "upper": 6, "shift": 6}
    segments = [s for samples in tasks.values() for s in samples if s.segments is not None]
    assert len(segments) == 6 and all({label for label, _ in s.segments} == {0, 1, 2} for s in segments)
    assert (tmp_path / "mixed" / "upper" / "test.jsonl").read_text() == (
        tmp_path / "data" / "upper" / "test.jsonl"
    ).read_text()


def test_a_text_the_tokenizer_cannot_write_is_refused_by_name(tmp_path):
    tokenizer = train_tiny_tokenizer(["[INST] copy: abc [/INST]\nabc"], tmp_path / "tok", vocab_size=None)
    check_round_trip(tokenizer, ["copy: cab", "[INST] abc"], "fine")
    with pytest.raises(ConfigError) as err:
        check_round_trip(tokenizer, ["copy: abc", "1. copy: abc", "sort: b.a"], "demo texts")
    message = str(err.value)
    assert message.startswith("demo texts: 2 texts do not survive the tokenizer round trip")
    assert "'1. copy: abc' holds characters the tokenizer lacks: '.1'" in message
    assert "'sort: b.a' holds characters the tokenizer lacks: '.rst'" in message
