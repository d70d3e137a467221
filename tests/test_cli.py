"""The `meteora-jax` command: demo end to end, and its error path."""

import numpy as np
import pytest

from meteora_jax.cli import main
from meteora_jax.demo import base_model


def test_demo_prints_real_logits(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "next-token logits, top 5" in printed and "ms compiled" in printed
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # The printed numbers are the model's: rerunning on the kept folder's seed gives the same.
    logits = base_model.run(seed=0, log=lambda *_: None)
    top = int(np.argmax(logits))
    assert f"id {top}: {logits[top]:.4f}" in printed


def test_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    assert main(["demo", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--force"]) == 0


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
