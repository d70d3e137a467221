"""The demo base from nothing: task folders, a near character-level tokenizer, a pre-trained HF base."""

from __future__ import annotations

import os

import numpy as np

import meteora_jax as mj
from meteora_jax.data.prompts import load_tokenizer
from meteora_jax.demo.pretrain import PretrainSettings
from meteora_jax.demo.setup import DEMO_TASKS, DemoBaseSettings, build_demo_base


def test_build_demo_base_writes_tasks_and_a_loadable_pretrained_base(tmp_path):
    settings = DemoBaseSettings(
        train=8, test=4, copies=64, composites=4, layers=1, hidden=32,
        pretrain=PretrainSettings(steps=6, batch_size=8, seq_len=320, lr=1e-2),
    )  # fmt: skip
    built = build_demo_base(os.fspath(tmp_path), settings, progress=False)
    assert sorted(os.listdir(built.data)) == sorted(DEMO_TASKS)
    for task in DEMO_TASKS:
        lines = (tmp_path / "data" / task / "test.jsonl").read_text().splitlines()
        assert len(lines) == 4
    tokenizer = load_tokenizer(built.base)
    assert tokenizer.tokenize("abcdefghij") == list("abcdefghij")  # letters stay single tokens
    model = mj.load_model(built.base)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tokenizer)
    assert len(built.pretrain_losses) == 6 and np.isfinite(built.pretrain_losses).all()
