"""Several hosts for real: two CPU processes on 127.0.0.1 joined by `jax.distributed.initialize`
(4 simulated devices each) train like one process with 8 devices (train-gate and train-lora)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.io.safetensors_io import SafetensorsFile

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(command, setup, out) -> list[str]:
    args = ["-m", "meteora_jax.cli", command, "--base", setup.base, "--out", out]
    if command == "train-gate":
        args += ["--data", setup.data]
        for name, folder in setup.adapters.items():
            args += ["--adapter", f"{name}={folder}"]
    else:
        args += ["--data", os.path.join(setup.data, "upper"), "--rank", "4"]
    args += [
        "--steps",
        str(STEPS),
        "--save-every",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
    ]
    return [*args, "--mesh", "data=2,fsdp=2,tensor=2", "--no-progress"]


def _losses(run_dir) -> list[tuple[int, float, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["lm_loss"], r.get("gate_loss", 0.0)) for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-gate", "train-lora"])
def test_two_processes_train_like_one_with_all_the_devices(command, tmp_path):
    setup = write_tiny_setup(os.fspath(tmp_path / "tiny"))
    single = os.fspath(tmp_path / "single")
    multi = os.fspath(tmp_path / "multi")
    port = _free_port()
    # the one-process reference runs alongside the two processes (most of each run is start-up)
    reference = subprocess.Popen(
        [sys.executable, *_args(command, setup, single)],
        env=subprocess_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs = [
        reference,
        *(
            subprocess.Popen(
                [
                    sys.executable,
                    *_args(command, setup, multi),
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                ],
                env=subprocess_env(4),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ),
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    run_dir = (lambda out: out) if command == "train-gate" else (lambda out: os.path.join(out, "training"))
    got, want = _losses(run_dir(multi)), _losses(run_dir(single))
    assert [s for s, *_ in got] == list(range(1, STEPS + 1))
    for (_, lm_a, gate_a), (_, lm_b, gate_b) in zip(got, want, strict=True):
        assert abs(lm_a - lm_b) <= 1e-5 * abs(lm_b) and abs(gate_a - gate_b) <= 1e-5 * abs(gate_b)
    saved = set(os.listdir(os.path.join(run_dir(multi), "2", "data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= saved  # each host saved its data position
    if command == "train-lora":  # process 0 wrote the adapter both processes gathered
        got, want = (SafetensorsFile(os.path.join(o, "adapter_model.safetensors")) for o in (multi, single))
        assert sorted(got.names()) == sorted(want.names())
        for name in want.names():
            np.testing.assert_allclose(
                np.array(got.get(name)), np.array(want.get(name)), rtol=1e-4, atol=1e-6
            )
