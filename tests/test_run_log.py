"""The run's log and its save / evaluation schedule, each on its own (no model, no training)."""

import json
import os

from meteora_jax.training.run_log import METRICS_FILE, RunLog
from meteora_jax.training.train_config import TrainConfig


def test_a_restored_log_keeps_the_steps_up_to_the_resumed_one(tmp_path, capsys):
    path = tmp_path / METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    lines.insert(1, "not json")
    lines.append(json.dumps({"step": 4, "eval": {"x": 1}}))
    path.write_text("\n".join(lines) + "\n")
    log = RunLog(str(tmp_path), "train-gate", progress=False)
    log.restore(2)
    assert [r["step"] for r in log.records] == [1, 2]
    assert "line 2 (1 lines in all) is not a JSON record" in capsys.readouterr().err
    log.rewrite()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    log.append({"step": 3, "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert log.last == {"step": 3, "loss": 0.5}


def test_a_line_cut_by_a_kill_is_left_out_without_a_word(tmp_path, capsys):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1}) + '\n{"step": 2, "lo')
    log = RunLog(str(tmp_path), "train-lora", progress=False)
    log.restore(5)
    assert log.records == [{"step": 1}]
    assert capsys.readouterr().err == ""


def test_a_new_run_writes_an_empty_log_and_no_bar(tmp_path):
    out = tmp_path / "run"
    log = RunLog(str(out), "train-gate", progress=False)
    log.rewrite()
    assert (out / METRICS_FILE).read_text() == ""
    log.start(0, 10)
    log.advance(loss="1")
    assert log.bar is None
    log.close()
    assert not os.path.exists(out / "curves.png")


def test_saves_and_evaluations_fall_on_their_periods_and_the_last_step():
    cfg = TrainConfig(steps=10, save_every=4, eval_every=3)
    assert [s for s in range(1, 11) if cfg.saves_at(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if cfg.evaluates_at(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if TrainConfig(steps=10, eval_every=0).evaluates_at(s)] == [10]
