"""`meteora-jax train-gate`: train the MeteoRA gates (optionally the adapters) on task folders."""

from __future__ import annotations

import argparse

from meteora_jax.commands import adapter_specs, add_adapter_flag
from meteora_jax.commands.flags import add_field_flags, field_values
from meteora_jax.commands.training_flags import (
    add_training_flags,
    data_config,
    join_processes,
    run_settings,
    train_settings,
)
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.training.train_config import TrainConfig

GATE_FLAGS = {
    "model": ("train_adapters", "top_k", "routing_noise"),
    "optimisation": ("gate_loss_weight", "gate_loss_grad"),
}


NAME = "train-gate"
HELP = "train the gates of a MeteoRA mixture on task folders (resumes a run in --out)"
DESCRIPTION = "Train MeteoRA gates: loss = LM CE + W * gate CE. Rerunning the same command resumes."


def add_flags(p: argparse.ArgumentParser) -> None:
    groups = add_training_flags(p)
    model, data = groups["model"], groups["data"]
    add_adapter_flag(model, required=True, note="its name matches a task folder")
    model.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from this checkpoint's gates and adapter stacks (its adapters: --adapter, in order)",
    )
    add_field_flags(model, TrainConfig, GATE_FLAGS["model"])
    data.add_argument("--data", required=True, metavar="DIR", help="DIR/<task>/train.jsonl (and test.jsonl)")
    data.add_argument("--tasks", nargs="+", metavar="NAME", help="train on these tasks only")
    add_field_flags(data, DataConfig, ("task_sampling",))
    add_field_flags(groups["optimisation"], TrainConfig, GATE_FLAGS["optimisation"])
    groups["run"].add_argument(
        "--out", required=True, metavar="DIR", help="the run folder (a meteora-jax checkpoint)"
    )


def spec_from_args(args: argparse.Namespace):
    """The `RunSpec` a parsed command line describes."""
    from meteora_jax.training.gates import RunSpec

    own = field_values(args, TrainConfig, [n for names in GATE_FLAGS.values() for n in names])
    train = TrainConfig(**train_settings(args), **own)
    return RunSpec(
        base=args.base,
        adapters=adapter_specs(args.adapter),
        data_dir=args.data,
        train=train,
        data=data_config(args, args.task_sampling),
        tasks=args.tasks,
        init_from=args.init_from,
        **run_settings(args),
    )


def run(args: argparse.Namespace) -> None:
    join_processes(args)
    from meteora_jax.training.gates import train

    result = train(spec_from_args(args))
    if result.evaluation:
        e = result.evaluation
        print(
            f"held-out routing: dominant adapter right for {e['dominant_accuracy']:.1%} of {e['prompts']} "
            f"prompts; last layer {e['last_layer_accuracy']:.1%} of tokens"
        )
    print(f"wrote {result.out} (step {result.step})")
