"""`meteora-jax train-lora`: train one LoRA adapter on a task folder, written as a PEFT adapter."""

from __future__ import annotations

import argparse

from meteora_jax.commands.flags import field_values
from meteora_jax.commands.training_flags import (
    add_training_flags,
    data_config,
    join_processes,
    run_settings,
    train_settings,
)
from meteora_jax.training.adapters import LoRASettings
from meteora_jax.training.train_config import LORA_DEFAULTS

# the `LoRASettings` fields, each set by the flag of its name (--rslora sets `use_rslora`)
LORA_FLAGS = ("rank", "alpha", "targets", "layers", "use_rslora", "dropout", "init_from")


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


NAME = "train-lora"
HELP = "train a LoRA adapter on one task folder, written as a PEFT adapter (resumes a run in --out)"
DESCRIPTION = (
    "Train one LoRA adapter (A random, B zero: step 0 is the base model) on DIR/train.jsonl with the "
    "LM loss. --out becomes a PEFT adapter folder, its run state in OUT/training; rerunning resumes."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    groups = add_training_flags(p, defaults={**LORA_DEFAULTS, "lm_loss": "response"})
    groups["data"].add_argument(
        "--data", required=True, metavar="TASK_DIR", help="one task folder: train.jsonl (and test.jsonl)"
    )
    lora = p.add_argument_group("the adapter (with --init-from: that adapter's values unless given)")
    lora.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    lora.add_argument("--alpha", type=float, help="lora_alpha (default 16)")
    lora.add_argument(
        "--targets", metavar="q_proj,v_proj,...|all-linear", help="projections to adapt (default all-linear)"
    )
    lora.add_argument("--layers", type=_layers, metavar="0,1,...", help="decoder layers (default all)")
    lora.add_argument(
        "--rslora",
        dest="use_rslora",
        action="store_true",
        default=None,
        help="scale by alpha / sqrt(r) (rank-stabilised LoRA)",
    )
    lora.add_argument(
        "--dropout", type=float, default=LoRASettings.dropout,
        help=f"LoRA dropout in training (default {LoRASettings.dropout:g})",
    )  # fmt: skip
    lora.add_argument(
        "--init-from", metavar="PEFT_DIR", help="continue this PEFT adapter instead of a new one"
    )
    groups["run"].add_argument("--out", required=True, metavar="DIR", help="the PEFT adapter folder to write")


def spec_from_args(args: argparse.Namespace):
    """The `LoRASpec` a parsed command line describes."""
    from meteora_jax.training.adapters import LoRASettings, LoRASpec, lora_train_config

    settings = train_settings(args)
    return LoRASpec(
        base=args.base,
        data_dir=args.data,
        train=lora_train_config(settings.pop("steps"), **settings),
        data=data_config(args),
        lora=LoRASettings(**field_values(args, LoRASettings, LORA_FLAGS)),
        **run_settings(args),
    )


def run(args: argparse.Namespace) -> None:
    join_processes(args)
    from meteora_jax.training.adapters import train_lora

    result = train_lora(spec_from_args(args))
    for when, e in (("before training", result.start_evaluation), (f"step {result.step}", result.evaluation)):
        if e:
            print(
                f"held-out ({when}): response NLL {e['response_nll']:.4f}, "
                f"exact match {e['exact_match']:.1%} of {e['samples']} samples"
            )
    print(f"wrote {result.out} (step {result.step})")
