"""`meteora-jax train-gate`: train the MeteoRA gates (optionally the adapters) on task folders."""

from __future__ import annotations

import argparse

from meteora_jax.commands import adapter_specs
from meteora_jax.commands.training_flags import (
    add_training_flags,
    data_config,
    join_processes,
    run_settings,
    train_settings,
)
from meteora_jax.data.sampling import TASK_SAMPLINGS
from meteora_jax.training.config import GATE_LOSS_GRADS, TrainConfig


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-gate",
        help="train the gates of a MeteoRA mixture on task folders (resumes a run in --out)",
        description="Train MeteoRA gates: loss = LM CE + W * gate CE. Rerunning the same command resumes.",
    )
    groups = add_training_flags(p, lr=5e-4, clip_norm=0.3, lm_loss="all", eval_what="held-out routing")
    model, data = groups["model"], groups["data"]
    model.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="a PEFT adapter folder; repeat in gate order (its name matches a task folder)",
    )
    model.add_argument("--train-adapters", action="store_true", help="train the LoRA stacks as well")
    model.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from this checkpoint's gates and adapter stacks (its adapters: --adapter, in order)",
    )
    model.add_argument("--top-k", type=int, default=2, help="adapters per token (default 2)")
    data.add_argument("--data", required=True, metavar="DIR", help="DIR/<task>/train.jsonl (and test.jsonl)")
    data.add_argument("--tasks", nargs="+", metavar="NAME", help="train on these tasks only")
    data.add_argument("--task-sampling", default="proportional", choices=TASK_SAMPLINGS)
    groups["optimisation"].add_argument("--gate-loss-weight", type=float, default=50.0)
    groups["optimisation"].add_argument(
        "--gate-loss-grad",
        default="gates",
        choices=GATE_LOSS_GRADS,
        help="what the gate term trains: the gates only (default) or everything upstream too (the reference)",
    )
    groups["run"].add_argument(
        "--out", required=True, metavar="DIR", help="the run folder (a meteora-jax checkpoint)"
    )
    p.set_defaults(func=run_command)
    return p


def spec_from_args(args: argparse.Namespace):
    """The `RunSpec` a parsed command line describes."""
    from meteora_jax.training.train_gate import RunSpec

    train = TrainConfig(
        **train_settings(args),
        gate_loss_weight=args.gate_loss_weight,
        gate_loss_grad=args.gate_loss_grad,
        train_adapters=args.train_adapters,
        top_k=args.top_k,
    )
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


def run_command(args: argparse.Namespace) -> None:
    join_processes(args)
    from meteora_jax.training.train_gate import train

    result = train(spec_from_args(args))
    if result.evaluation:
        e = result.evaluation
        print(
            f"held-out routing: dominant adapter right for {e['dominant_accuracy']:.1%} of {e['prompts']} "
            f"prompts; last layer {e['last_layer_accuracy']:.1%} of tokens"
        )
    print(f"wrote {result.out} (step {result.step})")
