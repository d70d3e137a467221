"""The command-line flags `train-gate` and `train-lora` share (data, optimisation, run, hosts),
declared once, and the settings objects they become."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from meteora_jax.commands.flags import add_field_flags, field_values
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.sharding import DEFAULT_MESH, parse_mesh
from meteora_jax.training.train_config import RunOptions, TrainConfig

TRAIN_FLAGS = {
    "model": ("dtype", "remat", "loss_chunk"),
    "optimisation": ("steps", "lr", "warmup_steps", "decay_steps", "weight_decay", "clip_norm", "grad_accum"),
    "run": ("seed", "save_every", "keep", "eval_every", "log_every", "new_data"),
}
DATA_FLAGS = ("seq_len", "batch_size", "packing", "lm_loss")
OPTION_FLAGS = ("backend", "attention")


def add_training_flags(
    p: argparse.ArgumentParser, *, defaults: Mapping[str, Any] | None = None
) -> dict[str, argparse._ArgumentGroup]:
    """Adds the shared flags in groups "model", "data", "optimisation", "run" and "several hosts"
    (returned, for a command's own flags). Each `TrainConfig` / `DataConfig` flag is derived from
    its field; `defaults` are the command's own defaults where they differ."""
    groups = {
        "model": p.add_argument_group("model"),
        "data": p.add_argument_group("data"),
        "optimisation": p.add_argument_group("optimisation"),
        "run": p.add_argument_group("run"),
        "hosts": p.add_argument_group("several hosts (omit on TPU pods / SLURM: auto-detected)"),
    }
    groups["model"].add_argument("--base", required=True, metavar="DIR", help="the HF LLaMA base folder")
    for group, names in TRAIN_FLAGS.items():
        add_field_flags(groups[group], TrainConfig, names, defaults=defaults)
    add_field_flags(groups["data"], DataConfig, DATA_FLAGS, defaults=defaults)
    run = groups["run"]
    run.add_argument("--force", action="store_true", help="replace an --out that is not a run of ours")
    mesh = ",".join(f"{axis}={size}" for axis, size in DEFAULT_MESH.items())
    run.add_argument("--mesh", default=mesh, metavar="data=N,fsdp=N,tensor=N", help=f"(default {mesh})")
    add_field_flags(run, RunOptions, OPTION_FLAGS)
    run.add_argument("--no-progress", dest="progress", action="store_false")
    hosts = groups["hosts"]
    hosts.add_argument("--coordinator", metavar="HOST:PORT")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    return groups


def train_settings(args: argparse.Namespace) -> dict:
    """The shared `TrainConfig` fields of parsed flags (a command adds its own)."""
    return field_values(args, TrainConfig, [n for names in TRAIN_FLAGS.values() for n in names])


def data_config(args: argparse.Namespace, task_sampling: str = DataConfig.task_sampling) -> DataConfig:
    values = field_values(args, DataConfig, DATA_FLAGS)
    return DataConfig(**values, task_sampling=task_sampling, seed=args.seed)


def run_settings(args: argparse.Namespace) -> dict:
    """The shared run fields of a spec (`RunSpec`, `LoRASpec`)."""
    options = RunOptions(
        mesh=parse_mesh(args.mesh), progress=args.progress, **field_values(args, RunOptions, OPTION_FLAGS)
    )
    return {"out": args.out, "force": args.force, "options": options}


def join_processes(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from the host flags (or the cluster's environment)."""
    from meteora_jax.training.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
