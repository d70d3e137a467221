"""train-lora: a PEFT adapter trained on one task folder with the gate-training engine.

The base is `write_tiny_setup`'s tiny LLaMA with its weights drawn at std 0.1 (at transformers'
0.02 a 64-wide model cannot make any next-token distribution peaked, so nothing could be learnt);
runs take seconds on 8 simulated CPU devices.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import kill_after_first_save, max_abs, torch_logits

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.errors import ConfigError
from meteora_jax.io.safetensors_io import SafetensorsFile
from meteora_jax.training.adapters import LoRASettings, LoRASpec, lora_train_config, train_lora
from meteora_jax.training.loop import TrainingError
from meteora_jax.training.train_config import RunOptions, TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:no gates given")
STEPS, SAVE_EVERY = 40, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")), init_std=0.1, train=128, test=16)


def _task(setup, name="upper") -> str:
    return os.path.join(setup.data, name)


def _cli(setup, out, *extra, steps=STEPS, save_every=SAVE_EVERY) -> list[str]:
    return [
        "train-lora", "--base", setup.base, "--data", _task(setup), "--out", os.fspath(out),
        "--steps", str(steps), "--save-every", str(save_every), "--eval-every", "20", "--seq-len", "64",
        "--batch-size", "8", "--lr", "1e-2", "--rank", "4", "--alpha", "8",
        "--mesh", "data=2,fsdp=2,tensor=2",
        "--no-progress", *extra,
    ]  # fmt: skip


def _records(out) -> list[dict]:
    with open(os.path.join(out, "training", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _weights(out) -> dict[str, np.ndarray]:
    file = SafetensorsFile(os.path.join(out, "adapter_model.safetensors"))
    return {name: np.array(file.get(name)) for name in file.names()}


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A 40-step run through the CLI (every projection of every layer, rank 4, alpha 8)."""
    out = tmp_path_factory.mktemp("trained") / "upper"
    assert main(_cli(setup, out)) == 0
    return out


def test_peft_loads_the_trained_adapter_with_our_logits(setup, trained):
    """PeftModel.from_pretrained(OUT) gives our model's logits with that adapter (float32, <= 1e-4),
    and they differ from the base's: the adapter learnt something."""
    settings = json.loads((trained / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["use_rslora"]) == (4, 8, False)
    assert set(settings["target_modules"]) == set(mj.config.PROJECTIONS)
    assert settings["layers_to_transform"] is None and settings["base_model_name_or_path"] == setup.base
    base = transformers.LlamaForCausalLM.from_pretrained(setup.base, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, base.config.vocab_size, (2, 40))
    base_logits = torch_logits(base, ids)
    peft_model = peft.PeftModel.from_pretrained(base, os.fspath(trained)).eval()
    ours = mj.load_model(setup.base, adapters={"upper": os.fspath(trained)}, top_k=1)
    got = np.asarray(ours(ids).logits)
    assert max_abs(got, torch_logits(peft_model, ids)) <= 1e-4
    assert max_abs(got, base_logits) > 1e-2


def test_training_lowers_the_held_out_nll_well_under_the_base(trained):
    """Step 0 (B = 0) is the base model; 40 steps later the held-out response NLL is well under
    it and more response tokens are the argmax. The log and the plot hold both."""
    records = _records(trained)
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evals) == [0, 20, 40]
    base, final = evals[0], evals[40]
    assert final["response_nll"] < 0.75 * base["response_nll"]
    assert final["token_accuracy"] > base["token_accuracy"] + 0.1
    losses = [r["lm_loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert not any(k.startswith("gate") for r in records if "loss" in r for k in r)
    assert os.path.getsize(trained / "training" / "curves.png") > 1000


def test_sigkill_between_saves_then_rerun_equals_an_uninterrupted_run(setup, trained, tmp_path):
    """A run killed (SIGKILL) after its first save and rerun ends with the weights (bit-equal) and
    loss curve of the uninterrupted run."""
    out = tmp_path / "upper"
    kill_after_first_save(_cli(setup, out), out / "training", SAVE_EVERY, STEPS)
    assert main(_cli(setup, out)) == 0
    got, want = _weights(out), _weights(trained)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    loss = lambda o: [(r["step"], r["loss"]) for r in _records(o) if "loss" in r]  # noqa: E731
    assert loss(out) == loss(trained)


def test_a_finished_run_rerun_rewrites_missing_peft_files(setup, trained, tmp_path, capsys):
    """Rerunning a finished run does no step, and writes the PEFT files again when a kill between
    the last checkpoint and them (here: a deletion) left them missing."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    want = _weights(trained)
    os.remove(out / "adapter_model.safetensors")
    assert main(_cli(setup, out)) == 0
    assert "nothing to do" in capsys.readouterr().err
    got = _weights(out)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_init_from_continues_the_adapter_exactly(setup, trained, tmp_path):
    """--init-from starts from that adapter as it is: the held-out figures before the first step
    equal those the first run ended with, and a step at lr 1e-30 leaves the weights bit-equal."""
    spec = LoRASpec(
        base=setup.base,
        data_dir=_task(setup),
        out=os.fspath(tmp_path / "continued"),
        train=lora_train_config(1, lr=1e-30),
        data=DataConfig(seq_len=64, batch_size=8, lm_loss="response"),
        lora=LoRASettings(init_from=os.fspath(trained), rank=4),  # a flag that agrees is fine
        options=RunOptions(mesh={"data": 2, "fsdp": 2, "tensor": 2}, progress=False),
    )
    result = train_lora(spec)
    before = result.start_evaluation
    ended = [r["eval"] for r in _records(trained) if "eval" in r][-1]
    assert before["response_nll"] == pytest.approx(ended["response_nll"], rel=1e-5)
    assert before["exact_match"] == ended["exact_match"]
    got, want = _weights(spec.out), _weights(trained)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(
        ConfigError, match=r"--init-from .*: --rank 8 \(the adapter has \[4\]\); --rslora True"
    ):
        train_lora(
            LoRASpec(**{**spec.__dict__, "out": os.fspath(tmp_path / "x"),
                        "lora": LoRASettings(init_from=os.fspath(trained), rank=8, use_rslora=True)})
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_subset_targets_layers_rslora_and_dropout_round_trip_through_peft(setup, tmp_path):
    """--targets q_proj,v_proj --layers 1 --rslora --dropout 0.1: the config PEFT reads says so,
    and PEFT's logits equal ours."""
    out = tmp_path / "subset"
    args = _cli(
        setup, out, "--targets", "q_proj,v_proj", "--layers", "1", "--rslora", "--dropout", "0.1", steps=6
    )
    assert main(args) == 0
    settings = peft.PeftConfig.from_pretrained(os.fspath(out))
    assert set(settings.target_modules) == {"q_proj", "v_proj"} and settings.layers_to_transform == [1]
    assert settings.use_rslora and settings.lora_dropout == pytest.approx(0.1)
    base = transformers.LlamaForCausalLM.from_pretrained(setup.base, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, os.fspath(out)).eval()
    ids = np.random.default_rng(1).integers(0, base.config.vocab_size, (1, 30))
    ours = mj.load_model(setup.base, adapters={"t": os.fspath(out)}, top_k=1)
    assert max_abs(np.asarray(ours(ids).logits), torch_logits(peft_model, ids)) <= 1e-4
    assert sorted(_weights(out)) == sorted(
        f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_{x}.weight" for p in "qv" for x in "AB"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "q_proj,qq_proj"], r"--targets 'q_proj,qq_proj': unknown target module qq_proj"),
        (["--rank", "0"], r"--rank must be an integer >= 1, got 0"),
        (["--alpha", "0"], r"--alpha must be a finite number > 0, got 0.0"),
        (["--alpha", "-2"], r"--alpha must be a finite number > 0, got -2.0"),
        (
            ["--layers", "0,5"],
            r"--layers \[0, 5\]: \[5\] outside the base model, which has 2 layers \(0 to 1\)",
        ),
        (["--layers", ","], r"--layers names no layer: the adapter would adapt nothing \(layers 0 to 1\)"),
        (["--dropout", "1"], r"--dropout must be a number in \[0, 1\), got 1.0"),
        (["--steps", "0"], r"steps must be an integer >= 1, got 0"),
        (["--mesh", "data=3"], r"--mesh"),
    ],
)
def test_bad_settings_are_named_and_nothing_is_written(setup, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main([*_cli(setup, out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteora-jax train-lora: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_data_and_outputs_are_refused(setup, tmp_path, capsys):
    """--data a folder of task folders, a bad line, --out inside --data, --out a foreign folder."""
    out = tmp_path / "out"
    args = _cli(setup, out)
    at = args.index("--data") + 1
    assert main([*args[:at], setup.data, *args[at + 1 :]]) == 2
    assert (
        "no train.jsonl; train-lora takes one task folder (it holds task folders" in capsys.readouterr().err
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    assert main([*args[:at], os.fspath(bad), *args[at + 1 :]]) == 2
    assert f"{bad / 'train.jsonl'} line 2" in capsys.readouterr().err
    inside = os.path.join(_task(setup), "out")
    assert main(_cli(setup, inside)) == 2
    assert "is inside --data" in capsys.readouterr().err and not os.path.exists(inside)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(_cli(setup, foreign)) == 2
    assert "holds something other than a meteora-jax train-lora run" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]
    not_utf8 = tmp_path / "out\udcff"  # a byte that is not UTF-8, as Python keeps it from argv
    assert main(_cli(setup, not_utf8)) == 2
    assert "holds byte 0xff" in capsys.readouterr().err and not not_utf8.exists()
    assert not out.exists()


def test_a_gate_training_config_is_refused_and_a_nan_loss_stops_the_run(setup, tmp_path):
    data = DataConfig(seq_len=64, batch_size=8)
    with pytest.raises(ConfigError, match=r"train-lora trains the adapter alone .*'gate_loss_weight': 50.0"):
        LoRASpec(setup.base, _task(setup), os.fspath(tmp_path / "a"), TrainConfig(steps=4, top_k=1), data)
    spec = LoRASpec(
        setup.base, _task(setup), os.fspath(tmp_path / "nan"),
        lora_train_config(8, lr=1e38, clip_norm=0.0, save_every=2), data,
        options=RunOptions(progress=False),
    )  # fmt: skip
    with pytest.raises(TrainingError, match=r"step \d: the loss is not finite \(loss (nan|inf), grad_norm"):
        train_lora(spec)


def _folder_bytes(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


def _set(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def test_extending_a_finished_run_with_changed_settings_keeps_it(
    setup, trained, tmp_path, capsys, monkeypatch
):
    """A finished run extended with another --batch-size is refused naming it, every file kept
    (the PEFT adapter, metrics.jsonl, every step); a step whose optimizer state has other entries
    than the run's is refused as such, not set aside as corrupt; --clip-norm 0 (clipping off)
    keeps the optimizer's structure, so that change resumes."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    with open(out / "training" / "metrics.jsonl", "r+b") as f:  # a damaged line amid the log
        lines = f.readlines()
        f.seek(0)
        f.writelines([*lines[:3], b"\xff\xfe not a record\n", *lines[3:]])
    before = _folder_bytes(out)
    longer = _set(_cli(setup, out), "--steps", str(STEPS + SAVE_EVERY))
    capsys.readouterr()
    assert main(_set(longer, "--batch-size", "16")) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot resume {out / 'training'} at step {STEPS}" in err and "batch_size: saved 8, now 16" in err
    assert "--new-data" in err and "\n" not in err and _folder_bytes(out) == before

    import optax

    from meteora_jax.training import state

    monkeypatch.setattr(state, "optimizer_transform", lambda config: optax.adamw(config.lr))
    assert main(longer) == 2
    err = capsys.readouterr().err.strip()
    assert (
        f"cannot resume {out / 'training'} (step {STEPS})" in err and "item 'opt' holds other entries" in err
    )
    assert "use another --out" in err and "\n" not in err and _folder_bytes(out) == before
    monkeypatch.undo()

    assert main([*longer, "--clip-norm", "0"]) == 0
    err = capsys.readouterr().err
    assert "clip_norm 1.0 -> 0.0" in err and f"resumed {out / 'training'} at step {STEPS}" in err
    assert "metrics.jsonl: line 4 (1 lines in all) is not a JSON record; left out" in err
    assert not any(n.startswith(".bad-step") for n in os.listdir(out / "training"))
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, STEPS + SAVE_EVERY + 1))


def test_a_held_out_prompt_longer_than_the_model_is_left_out_naming_its_line(setup, tmp_path, capsys):
    """A 64 KB prompt in test.jsonl: the run warns naming its file and line, leaves it out of the
    held-out figures and trains."""
    import shutil

    data = tmp_path / "upper"
    shutil.copytree(_task(setup), data)
    with open(data / "test.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "upper: " + "a" * 65536, "response": "A"}) + "\n")
    line = (data / "test.jsonl").read_text().count("\n")
    args = _set(_cli(setup, tmp_path / "out", steps=1, save_every=1), "--data", os.fspath(data))
    with pytest.warns(
        UserWarning, match=rf"1 held-out samples are longer .*test.jsonl line {line}, \d+ tokens"
    ):
        assert main(args) == 0
    assert "of 16 samples" in capsys.readouterr().out


def test_extending_past_the_decay_horizon_is_refused_as_training_nothing(setup, trained, tmp_path, capsys):
    """Steps after --decay-steps run at learning rate 0: extending a finished run only there is
    refused naming the setting, every file kept."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = _folder_bytes(out)
    args = [*_set(_cli(setup, out), "--steps", str(STEPS + SAVE_EVERY)), "--decay-steps", str(STEPS)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"from step {STEPS} to --steps {STEPS + SAVE_EVERY}: the learning rate is 0" in err
    assert f"--decay-steps {STEPS}" in err and "\n" not in err.split("error: ", 1)[1]
    assert _folder_bytes(out) == before
