"""Gate training: the step on every mesh, micro-batches, and whole runs (resume, faults, refusals).

Runs use `meteora_jax.demo.synthetic.write_tiny_setup`: a tiny base with its own tokenizer, three
random adapters and three string tasks; every run is a few seconds on 8 simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import kill_after_first_save, max_abs
from flax import nnx

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.config import PROJECTIONS, MoELoRAConfig
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.prompts import load_tokenizer
from meteora_jax.data.samples import encode_sample
from meteora_jax.data.tasks import load_tasks
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.errors import ConfigError, MeteoRAError
from meteora_jax.io import checkpoint
from meteora_jax.modeling.llama import LlamaForCausalLM
from meteora_jax.sharding import make_mesh
from meteora_jax.training import loop, run_lock
from meteora_jax.training.checkpointing import RunCheckpoints
from meteora_jax.training.gates import RunSpec, train
from meteora_jax.training.loop import TrainingError
from meteora_jax.training.routing_eval import RoutingEvaluation
from meteora_jax.training.state import shardings_of, split_for_training
from meteora_jax.training.step import batch_sharding, make_gradients
from meteora_jax.training.train_config import RunOptions, TrainConfig

CONFIG = mj.LlamaConfig(
    vocab_size=101,
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
)
MOE = MoELoRAConfig(("a", "b", "c", "d"), PROJECTIONS, 4, top_k=2)
B, S = 8, 12


@functools.cache
def _module_parts() -> tuple:
    module = LlamaForCausalLM(CONFIG, MOE, rngs=nnx.Rngs(0))
    lora = nnx.state(module, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(lora))))
    nnx.update(module, jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape), lora))
    return nnx.split(module)


def _module() -> LlamaForCausalLM:
    """Random model whose adapters really change the output (so the LM loss depends on the gates):
    built once (its eager initialisers compile dozens of tiny programs), a fresh module each call."""
    return nnx.merge(*_module_parts())


def _batch(seed: int = 0) -> dict:
    """Two packed samples per row, some padding, labels per segment."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, S), np.int32)
    seg[:, :5], seg[:, 5:10] = 1, 2
    seg[::2, 9:] = 0
    starts = np.where(seg == 2, 5, 0)
    positions = np.where(seg > 0, np.arange(S) - starts, 0).astype(np.int32)
    labels = np.where(seg > 0, rng.integers(0, 4, (B, 1)) + (seg == 2), -1).astype(np.int32) % 4
    labels = np.where(seg > 0, labels, -1).astype(np.int32)
    weights = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(np.float32)
    return {
        "input_ids": rng.integers(0, CONFIG.vocab_size, (B, S)).astype(np.int32),
        "segment_ids": seg,
        "positions": positions,
        "lm_targets": rng.integers(0, CONFIG.vocab_size, (B, S)).astype(np.int32),
        "lm_weights": np.concatenate([weights, np.zeros((B, 1), np.float32)], axis=1),
        "gate_labels": labels,
    }


def _gradients(mesh_shape, grad_accum=1, train_adapters=False, **train_kw):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    cfg = TrainConfig(steps=1, grad_accum=grad_accum, train_adapters=train_adapters, **train_kw)
    module = _module()  # outside the mesh: eager programs compiled under a mesh are its own
    with jax.set_mesh(mesh):
        parts, state, frozen = split_for_training(module, cfg)
        params = jax.device_put(state.params, shardings_of(state.params, mesh))
        frozen = jax.device_put(frozen, shardings_of(frozen, mesh))
        batch = {k: jax.device_put(v, batch_sharding(mesh, (B, S))) for k, v in _batch().items()}
        grads, sums, den = jax.jit(make_gradients(parts, cfg))(params, frozen, batch, jax.random.key(1))
        loss = float(sums.lm_ce / den.lm + cfg.gate_loss_weight * sums.gate_ce / den.gate)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    return loss, flat


@pytest.fixture(scope="module")
def one_device():
    return _gradients((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_step_gives_the_same_loss_and_gate_gradients_on_every_mesh(one_device, mesh_shape, record_error):
    """Sharded over data, fsdp and tensor axes, the loss and every gate gradient equal one device's
    (float32, max abs error <= 1e-5 relative to the largest gradient)."""
    loss, grads = _gradients(mesh_shape)
    want_loss, want = one_device
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    assert grads.keys() == want.keys() and all(k.endswith("gate") for k in grads)
    scale = max(float(np.max(np.abs(g))) for g in want.values())
    err = max(max_abs(grads[k], want[k]) for k in want)
    record_error(f"gate grads {mesh_shape}", err / scale)
    assert err <= 1e-5 * scale


def test_micro_batches_sum_to_the_full_batch(one_device):
    """grad_accum=4 (four micro-batches in one step) gives the one-batch loss and gradients."""
    loss, grads = _gradients((2, 2, 2), grad_accum=4)
    want_loss, want = one_device
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    scale = max(float(np.max(np.abs(g))) for g in want.values())
    assert max(max_abs(grads[k], want[k]) for k in want) <= 1e-5 * scale


def test_train_adapters_adds_the_lora_stacks_only():
    _, grads = _gradients((1, 1, 1), train_adapters=True)
    kinds = {k.rsplit("/", 1)[-1] for k in grads}
    assert kinds == {"gate", "lora_a", "lora_b"}


def test_gate_loss_gradient_reaches_the_gates_only_by_default():
    """gate_loss_grad="gates": the adapters' gradients are the LM loss's alone (those of a run
    without the gate term), while "all" (the reference) lets the gate term reach them too; the
    loss itself is the same either way."""
    loss, grads = _gradients((1, 1, 1), train_adapters=True)
    lm_loss, lm_only = _gradients((1, 1, 1), train_adapters=True, gate_loss_weight=0.0)
    loss_all, grads_all = _gradients((1, 1, 1), train_adapters=True, gate_loss_grad="all")
    assert loss == pytest.approx(loss_all, rel=1e-6) and loss > lm_loss
    lora = [k for k in grads if not k.endswith("gate")]
    scale = max(float(np.max(np.abs(lm_only[k]))) for k in lora)
    assert max(max_abs(grads[k], lm_only[k]) for k in lora) <= 1e-5 * scale
    assert max(max_abs(grads_all[k], lm_only[k]) for k in lora) > 1e-2 * scale
    with pytest.raises(ConfigError, match="gate_loss_grad must be one of .*got 'none'"):
        TrainConfig(steps=1, gate_loss_grad="none")


def test_routing_noise_draws_the_step_choice_the_same_on_every_mesh(one_device):
    """routing_noise > 0 draws each token's top-k in the step (the loss moves; the same key draws
    the same choice, on one device and on a (2, 2, 2) mesh); a negative scale is refused."""
    loss, grads = _gradients((1, 1, 1), routing_noise=1.0)
    want_loss, want = one_device
    assert abs(loss - want_loss) > 1e-4 * abs(want_loss)
    scale = max(float(np.max(np.abs(g))) for g in want.values())
    assert max(max_abs(grads[k], want[k]) for k in want) > 1e-3 * scale
    sharded_loss, sharded = _gradients((2, 2, 2), routing_noise=1.0)
    assert abs(sharded_loss - loss) <= 1e-5 * abs(loss)
    assert max(max_abs(sharded[k], grads[k]) for k in grads) <= 1e-5 * scale
    with pytest.raises(ConfigError, match=r"routing_noise must be a finite number >= 0, got -1"):
        TrainConfig(steps=1, routing_noise=-1)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(os.fspath(tmp_path_factory.mktemp("tiny")))


def _spec(setup, out, *, steps=8, save_every=4, mesh=None, **train_kw) -> RunSpec:
    train_cfg = TrainConfig(steps=steps, lr=1e-2, save_every=save_every, **train_kw)
    return RunSpec(
        base=setup.base,
        adapters=setup.adapters,
        data_dir=setup.data,
        out=os.fspath(out),
        train=train_cfg,
        data=DataConfig(seq_len=64, batch_size=8),
        options=RunOptions(mesh=mesh or {"data": 2, "fsdp": 2, "tensor": 2}, progress=False),
    )


def _records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _gates(out) -> dict:
    params = checkpoint.restore(out).params
    return {p: v for p, v in params.items() if p[-1] == "gate"}


def _losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]


def _cli_args(setup, out, steps, save_every) -> list[str]:
    args = ["train-gate", "--base", setup.base, "--data", setup.data, "--out", os.fspath(out)]
    for name, folder in setup.adapters.items():
        args += ["--adapter", f"{name}={folder}"]
    args += ["--steps", str(steps), "--save-every", str(save_every), "--seq-len", "64", "--batch-size", "8"]
    return [*args, "--lr", "1e-2", "--mesh", "data=2,fsdp=2,tensor=2", "--no-progress"]


STEPS, SAVE_EVERY = 40, 8


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """A 40-step run, saving every 8 steps, through the CLI."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(_cli_args(setup, out, STEPS, SAVE_EVERY)) == 0
    return out


def test_sigkill_between_saves_then_rerun_equals_an_uninterrupted_run(setup, uninterrupted, tmp_path):
    """A run killed (SIGKILL) after its first save, then rerun with the same command, ends with the
    gates (bit-equal) and loss curve of a run never interrupted; the killed steps are redone."""
    out = tmp_path / "run"
    kill_after_first_save(_cli_args(setup, out, STEPS, SAVE_EVERY), out, SAVE_EVERY, STEPS)
    assert main(_cli_args(setup, out, STEPS, SAVE_EVERY)) == 0
    got, want = _gates(out), _gates(uninterrupted)
    assert max(max_abs(got[p], want[p]) for p in want) == 0.0
    assert _losses(out) == _losses(uninterrupted)
    assert checkpoint.checkpoint_steps(out)[-1] == STEPS


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_the_step_and_the_rerun_equals_an_uninterrupted_run(
    setup, uninterrupted, tmp_path, capsys, monkeypatch, signum
):
    """Ctrl-C (or a scheduler's SIGTERM) during step 3: the run saves step 3 (not a save step),
    says so in one line, exits 128 + the signal; the rerun ends bit-equal to a run never stopped."""
    out = tmp_path / "run"
    real_batch, calls = loop._global_batch, []

    def batch_then_signal(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real_batch(*args)

    monkeypatch.setattr(loop, "_global_batch", batch_then_signal)
    capsys.readouterr()
    assert main(_cli_args(setup, out, STEPS, SAVE_EVERY)) == 128 + signum
    err = capsys.readouterr().err.strip()
    name = signal.Signals(signum).name
    assert err == (
        f"meteora-jax train-gate: stopped by {name} after step 3; the last good checkpoint is step 3 in "
        f"{out}: rerun the same command to resume from there"
    )
    assert checkpoint.checkpoint_steps(out) == [3]
    monkeypatch.undo()
    assert main(_cli_args(setup, out, STEPS, SAVE_EVERY)) == 0
    got, want = _gates(out), _gates(uninterrupted)
    assert max(max_abs(got[p], want[p]) for p in want) == 0.0
    assert _losses(out) == _losses(uninterrupted)


def test_init_from_starts_at_a_checkpoint_and_refuses_other_adapters(setup, uninterrupted, tmp_path):
    """--init-from: the run starts from the checkpoint's gates (one step at lr 1e-12 keeps them);
    a checkpoint of the adapters in another order is refused by name before --out is touched."""
    spec = _spec(setup, tmp_path / "run", steps=1, save_every=1)
    spec = RunSpec(**{**spec.__dict__, "init_from": os.fspath(uninterrupted)})
    spec = RunSpec(**{**spec.__dict__, "train": TrainConfig(steps=1, lr=1e-12, save_every=1)})
    train(spec)
    got, want = _gates(tmp_path / "run"), _gates(uninterrupted)
    assert max(max_abs(got[p], want[p]) for p in want) < 1e-6
    reordered = dict(reversed(list(setup.adapters.items())))
    bad = RunSpec(**{**spec.__dict__, "adapters": reordered, "out": os.fspath(tmp_path / "other")})
    with pytest.raises(ConfigError, match=r"--init-from .* holds the adapters \[.*\]; the run names \["):
        train(bad)
    assert not (tmp_path / "other").exists()


def test_run_folder_is_an_ordinary_checkpoint(setup, uninterrupted, tmp_path):
    """load_model(base, gates=OUT) and (base, adapters, gates=OUT) give the trained gates; the run
    folder has metrics.jsonl (one record per step) and curves.png."""
    trained = _gates(uninterrupted)
    from_ckpt = mj.load_model(setup.base, gates=uninterrupted)
    with_adapters = mj.load_model(setup.base, adapters=setup.adapters, gates=uninterrupted)
    ids = np.asarray([[1, 5, 9, 14, 3]], np.int32)
    np.testing.assert_array_equal(from_ckpt(ids).logits, with_adapters(ids).logits)
    state = checkpoint.model_params(from_ckpt.module)
    for path, value in trained.items():
        np.testing.assert_array_equal(np.asarray(state[path]), value)
    assert [r["step"] for r in _records(uninterrupted) if "loss" in r] == list(range(1, STEPS + 1))
    assert os.path.getsize(os.path.join(uninterrupted, "curves.png")) > 1000
    generate = ["generate", "--ckpt", os.fspath(uninterrupted), "--prompt", "reverse: abc"]
    assert main([*generate, "--max-new-tokens", "3"]) == 0


def test_corrupt_latest_step_is_set_aside_and_the_previous_one_used(setup, tmp_path):
    out = tmp_path / "run"
    train(_spec(setup, out, steps=8, save_every=4))
    meta_dir = out / "8" / "meta"
    for f in meta_dir.iterdir():
        f.write_text("{not json")
    with pytest.warns(UserWarning, match=r"step 8 is unreadable or corrupt"):
        result = train(_spec(setup, out, steps=12, save_every=4))
    assert result.step == 12 and checkpoint.checkpoint_steps(out) == [4, 8, 12]
    assert any(name.startswith(".bad-step-8-") for name in os.listdir(out))


def test_a_numbered_folder_that_is_no_step_is_set_aside_not_left_to_block_saves(setup, tmp_path):
    """Orbax counts any numbered folder as a step and silently skips saving a lower one: a stray
    empty `10` made an extended run save nothing (exit 0). It is set aside, kept, and named."""
    out = tmp_path / "run"
    train(_spec(setup, out, steps=2, save_every=2))
    (out / "10").mkdir()
    (out / "10" / "mine.txt").write_text("kept")
    with pytest.warns(
        UserWarning, match=r"step 10 is unreadable or corrupt \(a step folder without metadata"
    ):
        result = train(_spec(setup, out, steps=4, save_every=2))
    assert result.step == 4 and checkpoint.checkpoint_steps(out) == [2, 4]
    [aside] = [n for n in os.listdir(out) if n.startswith(".bad-step-10-")]
    assert (out / aside / "mine.txt").read_text() == "kept"


def test_a_larger_steps_extends_a_finished_run_and_the_log_says_the_schedule_changed(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train(_spec(setup, out, steps=4, save_every=4))
    capsys.readouterr()
    train(_spec(setup, out, steps=8, save_every=4))
    err = capsys.readouterr().err
    assert "horizon changes from 4 to 8" in err and "resumed" in err
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, 9))
    again = train(_spec(setup, out, steps=8, save_every=4))
    assert again.step == 8 and "nothing to do" in capsys.readouterr().err


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced."""
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def _folder_bytes(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


def test_changed_data_or_batch_size_is_refused_and_the_run_kept_until_new_data(setup, tmp_path, capsys):
    """A finished run rerun with another --batch-size, or after lines were appended to a task file,
    is refused naming what changed, leaving every file as it was (no step set aside, no output
    rewritten); --new-data goes on from the last step with the data stream from its start."""
    data = tmp_path / "data"
    shutil.copytree(setup.data, data)
    out = tmp_path / "run"
    args = [a if a != setup.data else os.fspath(data) for a in _cli_args(setup, out, 4, 4)]
    assert main(args) == 0
    before = _folder_bytes(out)
    capsys.readouterr()
    longer = _set(args, "--steps", "8")
    assert main(_set(longer, "--batch-size", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot resume {out} at step 4" in err and "batch_size: saved 8, now 4" in err
    assert "--new-data" in err and "\n" not in err
    assert _folder_bytes(out) == before
    task = sorted(os.listdir(data))[0]
    with open(data / task / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "upper: abc", "response": "ABC"}) + "\n")
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "tasks: saved" in err and "samples: saved" in err
    assert _folder_bytes(out) == before
    assert main([*longer, "--new-data"]) == 0
    err = capsys.readouterr().err
    assert "step 4: the data changed (samples, tasks); going on with it" in err
    assert checkpoint.checkpoint_steps(out) == [4, 8] and not any(
        n.startswith(".bad-step") for n in os.listdir(out)
    )
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, 9))


def test_a_huge_held_out_prompt_is_left_out_naming_its_line(setup, tmp_path):
    """A 64 KB prompt in a test split is left out of the held-out evaluation with one warning
    naming its file and line; the run trains and evaluates the others."""
    data = tmp_path / "data"
    shutil.copytree(setup.data, data)
    task = sorted(os.listdir(data))[0]
    with open(data / task / "test.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": f"{task}: " + "a" * 65536, "response": "x"}) + "\n")
    lines = (data / task / "test.jsonl").read_text().count("\n")
    spec = dataclasses.replace(
        _spec(setup, tmp_path / "run", steps=2, save_every=2), data_dir=os.fspath(data)
    )
    with pytest.warns(
        UserWarning, match=rf"1 held-out samples are longer than --seq-len 64 .*test.jsonl line {lines}"
    ):
        result = train(spec)
    prompts = sum((data / t / "test.jsonl").read_text().count("\n") for t in os.listdir(data))
    assert result.step == 2 and result.evaluation["prompts"] == prompts - 1


def test_a_failing_evaluation_loses_no_step(setup, tmp_path, monkeypatch):
    """The last step is saved before the end-of-run evaluation: when that evaluation fails, a
    rerun finds the run finished."""

    def broken(self, model, mesh):
        raise MemoryError("evaluation ran out of memory")

    monkeypatch.setattr(RoutingEvaluation, "__call__", broken)
    out = tmp_path / "run"
    with pytest.raises(MemoryError):
        train(_spec(setup, out, steps=3, save_every=2))
    assert checkpoint.checkpoint_steps(out) == [2, 3]


def test_a_full_disk_is_one_line_naming_the_path_and_the_last_good_step(setup, tmp_path, monkeypatch, capsys):
    """A save that hits ENOSPC (raised as Orbax does, wrapped in its own error) ends the command
    with one line naming the path, the cause and the last good checkpoint (exit 2); the rerun
    resumes from that step and equals an uninterrupted run."""
    out = tmp_path / "run"
    real_save = RunCheckpoints.save

    def save(self, step, *args, **kwargs):
        if step == 8:
            try:
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(out / "8" / "opt"))
            except OSError as e:
                raise RuntimeError("could not write the checkpoint") from e
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save)
    args = _cli_args(setup, out, 12, 4)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert (
        f"{out}: No space left on device (saving step 8): training stopped; "
        "the last good checkpoint is step 4" in err
    )
    monkeypatch.setattr(RunCheckpoints, "save", real_save)
    assert main(args) == 0
    assert checkpoint.checkpoint_steps(out) == [4, 8, 12]
    assert [r["step"] for r in _records(out) if "loss" in r] == list(range(1, 13))


def test_out_holding_a_converted_checkpoint_is_refused_and_left_untouched(setup, tmp_path, capsys):
    """A `convert` checkpoint has steps but no run state: refused as what it is, before the lock
    file (or anything else) is written into it."""
    converted = tmp_path / "converted"
    adapters = [a for name, folder in setup.adapters.items() for a in ("--adapter", f"{name}={folder}")]
    assert main(["convert", "--base", setup.base, *adapters, "--out", os.fspath(converted)]) == 0
    before = _folder_bytes(converted)
    capsys.readouterr()
    assert main(_cli_args(setup, converted, 2, 2)) == 2
    err = capsys.readouterr().err
    assert f"--out {converted} holds a checkpoint without run state (as `convert` writes)" in err
    assert _folder_bytes(converted) == before and not (converted / run_lock.LOCK_FILE).exists()


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """lr 1e38 sends the gate logits past float32 after the first update: the run stops at the first step
    whose loss is not finite, and the checkpoint saved before it stays."""
    out = tmp_path / "run"
    spec = _spec(setup, out, steps=8, save_every=1)
    spec = RunSpec(**{**spec.__dict__, "train": TrainConfig(steps=8, lr=1e38, save_every=1, clip_norm=0.0)})
    with pytest.raises(
        TrainingError, match=r"step \d+: the loss is not finite .* last good checkpoint is step"
    ):
        train(spec)
    steps = checkpoint.checkpoint_steps(out)
    assert steps and steps[-1] < 8
    assert checkpoint.restore(out, steps[-1]).params  # the kept step reads back


def test_out_holding_something_else_is_refused_unless_force(setup, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        TrainingError, match=r"--out .*busy holds something other than a meteora-jax train-gate run"
    ):
        train(_spec(setup, out, steps=1))
    assert (out / "notes.txt").read_text() == "mine"
    spec = _spec(setup, out, steps=1)
    train(RunSpec(**{**spec.__dict__, "force": True}))
    assert not (out / "notes.txt").exists() and checkpoint.checkpoint_steps(out) == [1]


def test_a_live_run_keeps_its_folder_and_a_killed_one_leaves_no_stale_lock(setup, tmp_path):
    """While another process holds the run folder's lock, a second run is refused (even with
    --force) and touches nothing; once that process is killed (-9) the folder trains again."""
    out = tmp_path / "shared"
    script = (
        "import time\nfrom meteora_jax.training import run_lock\n"
        f"with run_lock.hold({os.fspath(out)!r}, 'train-gate'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = re.escape(os.fspath(out / run_lock.LOCK_FILE))
        for force in (False, True):
            spec = RunSpec(**{**_spec(setup, out, steps=1).__dict__, "force": force})
            with pytest.raises(TrainingError, match=rf"shared is in use by another .*training run .*{lock}"):
                train(spec)
            assert os.listdir(out) == [run_lock.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    train(_spec(setup, out, steps=1))  # a folder holding only a dead run's lock is ours: it trains
    assert checkpoint.checkpoint_steps(out) == [1]


def test_one_adapter_whose_gates_cannot_learn_is_refused(setup, tmp_path, capsys):
    """With one adapter every token goes to it whatever the gate says: the gates get no gradient,
    so such a run would train nothing (and exit 0); it is refused before --out is touched."""
    out = tmp_path / "run"
    name, folder = next(iter(setup.adapters.items()))
    args = ["train-gate", "--base", setup.base, "--data", setup.data, "--out", os.fspath(out), "--steps", "2"]
    assert main([*args, "--adapter", f"{name}={folder}", "--tasks", name, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"train-gate with one adapter ({name}) trains nothing" in err and "--train-adapters" in err
    assert not out.exists()


def test_a_run_folder_it_may_not_write_is_named_as_given(setup, tmp_path, capsys, monkeypatch):
    """A run folder whose lock file cannot be created (no permission) is one line naming the run
    folder (not the lock file the user never named), "PATH: Permission denied", exit 2."""
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.fspath(path).endswith(run_lock.LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", denied)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_cli_args(setup, out, 2, 2)) == 2
    assert capsys.readouterr().err.strip() == f"meteora-jax train-gate: error: {out}: Permission denied"


def test_out_inside_an_input_is_refused(setup):
    with pytest.raises(MeteoRAError, match=r"--out .* --data"):
        train(_spec(setup, os.path.join(setup.data, "run"), steps=1))


def test_resume_with_other_adapters_or_train_adapters_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train(_spec(setup, out, steps=2, save_every=2))
    names = list(setup.adapters)
    swapped = {
        names[1]: setup.adapters[names[0]],
        names[0]: setup.adapters[names[1]],
        names[2]: setup.adapters[names[2]],
    }
    spec = _spec(setup, out, steps=4)
    with pytest.raises(ConfigError, match=r"cannot resume .*adapters"):
        train(RunSpec(**{**spec.__dict__, "adapters": swapped}))
    with pytest.raises(
        ConfigError, match=r"train_adapters=False, now train_adapters=True \(--train-adapters\)"
    ):
        train(_spec(setup, out, steps=4, train_adapters=True))
    assert checkpoint.checkpoint_steps(out) == [2]


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, r"--mesh: .*need 3 devices, found 8"),
        ({"data": 8, "fsdp": 1, "tensor": 1}, r"--batch-size 8 does not split into --grad-accum 2"),
    ],
)
def test_bad_mesh_is_refused_naming_the_setting(setup, tmp_path, mesh, message):
    with pytest.raises(ConfigError, match=message):
        train(_spec(setup, tmp_path / "run", steps=1, mesh=mesh, grad_accum=2))
    assert not (tmp_path / "run").exists()


def test_gates_learn_to_route_held_out_prompts(setup, tmp_path):
    """The acceptance figure on the (2, 2, 2) mesh: after 200 steps the dominant adapter of a
    held-out prompt (top-1 votes over every layer and projection, after the shared prefix) is its
    task for >= 90% of prompts, and the last layer's gates choose it for >= 85% of tokens."""
    result = train(_spec(setup, tmp_path / "run", steps=200, save_every=200, warmup_steps=10))
    assert result.evaluation["dominant_accuracy"] >= 0.90
    assert result.evaluation["last_layer_accuracy"] >= 0.85


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b'{"prompt": "upper: abc"\n', "not valid JSON"),
        (b'{"prompt": "upper: ab\xff", "response": "AB"}\n', "not UTF-8 text (byte 0xff at column 22)"),
        (b'{"prompt": "upper: \\ud800", "response": "X"}\n', "lone surrogate ('\\ud800')"),
    ],
)
def test_bad_data_fails_at_once_naming_file_and_line(setup, tmp_path, capsys, line, says):
    """A malformed line, a byte that is not UTF-8 or a lone surrogate ends the command (exit 2)
    with one line naming the file and line, before the model is loaded; nothing is written."""
    data = tmp_path / "data"
    shutil.copytree(setup.data, data)
    with open(data / "upper" / "train.jsonl", "ab") as f:
        f.write(line)
    args = _cli_args(setup, tmp_path / "run", 2, 2)
    args[args.index("--data") + 1] = os.fspath(data)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upper/train.jsonl line 65: " in err[0] and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_few_long_samples_warn_once_and_every_step_counts_its_cut_ones(setup, tmp_path, capsys):
    """--seq-len 15 cuts a few samples of each task (every prompt fits): one warning before the run
    gives their count, and each step's log line and record count the cut samples it held."""
    tokenizer = load_tokenizer(setup.base)
    tasks = load_tasks(setup.data, list(setup.adapters))
    lengths = [len(encode_sample(tokenizer, s)["input_ids"]) for t in tasks.values() for s in t]
    longer = sum(n > 15 for n in lengths)
    assert 0 < longer < len(lengths) // 4
    spec = _spec(setup, tmp_path / "run", steps=8, save_every=8)
    spec = RunSpec(**{**spec.__dict__, "data": DataConfig(seq_len=15, batch_size=16, packing=False)})
    with pytest.warns(UserWarning) as caught:
        train(spec)
    (warned,) = (str(w.message) for w in caught if "--seq-len 15 cuts" in str(w.message))
    assert warned.startswith(f"--seq-len 15 cuts {longer} training samples")
    assert warned.endswith(f"--seq-len {max(lengths)} fits every sample")
    err = capsys.readouterr().err
    assert err.count("WARNING: --seq-len 15 cuts") == 1
    logged = re.findall(r"step (\d+): (\d+) samples longer than --seq-len 15 were truncated", err)
    recorded = {r["step"]: r["truncated"] for r in _records(tmp_path / "run") if r.get("truncated")}
    assert logged and {int(step): int(n) for step, n in logged} == recorded


def test_bfloat16_compute_with_remat_keeps_float32_gates(setup, tmp_path):
    """--dtype bfloat16 stores the frozen weights in bfloat16 and trains float32 gates; with
    --remat full and --grad-accum 2 the first step's loss is within bf16 rounding of float32's."""
    out32, out16 = tmp_path / "f32", tmp_path / "bf16"
    train(_spec(setup, out32, steps=1, save_every=1))
    train(_spec(setup, out16, steps=1, save_every=1, dtype="bfloat16", remat="full", grad_accum=2))
    (loss32,), (loss16,) = ([r["loss"] for r in _records(o) if "loss" in r] for o in (out32, out16))
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32)
    assert all(v.dtype == np.float32 for v in _gates(out16).values())


def test_attention_flag_reaches_the_step_and_splash_trains_like_xla(setup, tmp_path, capsys):
    """--attention splash (Pallas interpret mode here) on packed 128-token rows: the first step's
    losses equal XLA attention's (its held-out evaluation, at the prompts' own lengths, runs XLA);
    a --seq-len splash cannot take is refused before anything is written."""
    refused = tmp_path / "refused"
    assert main([*_cli_args(setup, refused, 1, 1), "--attention", "splash"]) == 2
    assert "--attention splash needs --seq-len a multiple of 128, got 64" in capsys.readouterr().err
    assert not refused.exists() or not os.listdir(refused)
    losses = {}
    for attention in ("xla", "splash"):
        out = tmp_path / attention
        args = [*_cli_args(setup, out, 1, 1), "--seq-len", "128", "--attention", attention]
        assert main(args) == 0
        (losses[attention],) = (r for r in _records(out) if "loss" in r)
    for key in ("loss", "lm_loss", "gate_loss"):
        assert abs(losses["splash"][key] - losses["xla"][key]) <= 1e-5 * (1 + abs(losses["xla"][key]))


def test_bad_training_settings_are_named(capsys):
    with pytest.raises(ConfigError, match=r"steps must be an integer >= 1, got 0; lr must be a finite"):
        TrainConfig(steps=0, lr=float("nan"))
    with pytest.raises(ConfigError, match=r"remat must be one of"):
        TrainConfig(steps=1, remat="some")
    with pytest.raises(ConfigError, match=r"loss_chunk must be an integer >= 0, got -1"):
        TrainConfig(steps=1, loss_chunk=-1)
    with pytest.raises(ConfigError, match=r"--mesh 'data=2,gpu=4'"):
        from meteora_jax.sharding import parse_mesh

        parse_mesh("data=2,gpu=4")
    code = main(
        ["train-gate", "--base", "b", "--adapter", "a", "--data", "d", "--out", "o", "--coordinator", "x:1"]
    )
    assert code == 2 and "give all three or none" in capsys.readouterr().err


def test_frozen_adapter_stacks_are_written_once_per_run(setup, uninterrupted, tmp_path):
    """Steps hold the gates only; the frozen stacks and scales live once in the run folder's shared
    file, which load_model uses, and whose loss is a one-line CorruptCheckpointError."""
    import shutil

    shared = uninterrupted / checkpoint.SHARED_FILE
    assert shared.is_file()
    for step in checkpoint.checkpoint_steps(uninterrupted):
        stored = b"".join(
            f.read_bytes() for f in (uninterrupted / str(step) / "params").rglob("*") if f.is_file()
        )
        assert b"gate" in stored and b"lora_a" not in stored and b"lora_b" not in stored
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    os.remove(copy / checkpoint.SHARED_FILE)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"shared parameters .* are missing"):
        mj.load_model(setup.base, gates=copy)


def test_reading_a_training_step_logs_no_orbax_noise(uninterrupted, caplog):
    """Reading only the parameters of a step that also holds optimizer and data state is normal:
    Orbax's 'could not be restored' warnings about the other items are not shown."""
    import logging

    with caplog.at_level(logging.INFO, logger="absl"):
        checkpoint.read_meta(uninterrupted)
        checkpoint.restore(uninterrupted)
    assert caplog.records  # Orbax does log here (so the check below can fail) ...
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]  # ... but not that


@pytest.mark.parametrize("warmup", [0, 3, 8, 20])
def test_the_schedule_warms_up_then_decays_to_zero_at_the_horizon(warmup):
    """Linear warmup to lr, cosine to 0 at the horizon; a warmup as long as (or longer than) the run
    still gives a finite schedule that peaks before the horizon."""
    from meteora_jax.training.state import learning_rate

    schedule = learning_rate(TrainConfig(steps=8, lr=1e-2, warmup_steps=warmup))
    values = [float(schedule(i)) for i in range(10)]
    assert all(np.isfinite(values)) and values[8] == 0.0 and values[9] == 0.0
    peak = min(warmup, 7)
    assert values[peak] == pytest.approx(1e-2) and max(values) == pytest.approx(1e-2)
    assert values[0] == (0.0 if warmup else pytest.approx(1e-2))
