"""`meteora-jax eval`: answer held-out task prompts (and composite-n prompts) in each routing mode,
score them with each task's metrics, and write results.json, report.md, predictions.jsonl and
the routing view of the first composite prompt."""

from __future__ import annotations

import argparse
import os
import sys

from meteora_jax.commands import add_model_flags, model_inputs, model_sources
from meteora_jax.commands.flags import add_field_flags, field_values
from meteora_jax.data.composite import COMPOSITE_LAYOUTS, CompositeSettings
from meteora_jax.evaluation.eval_run import EvalSpec
from meteora_jax.evaluation.runner import MODES, EvalSettings

SETTINGS_FLAGS = ("batch_size", "max_new_tokens", "routing_temperature", "composite_routing_temperature")
# `EvalSpec` fields set by flags of the same name (--tasks is `tasks_dir`, --task adds to `tasks`)
SPEC_FLAGS = ("tokenizer", "dtype", "tasks_dir", "tasks", "composite", "composite_n", "composite_samples")
SPEC_FLAGS += ("composite_layout", "seed", "metrics", "out", "force", "progress")


NAME = "eval"
HELP = "score a model on held-out task prompts and composite-n prompts, per routing mode"
DESCRIPTION = (
    "Greedy answers to each task's test split (and composite prompts), scored with the task's "
    "metrics, in the modes asked for: meteora (the gates), adapter (the task's own adapter), base, "
    "merged (the uniform average of the adapters)."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, dtypes=("float32", "bfloat16"))
    data = p.add_argument_group("prompts")
    data.add_argument(
        "--tasks",
        dest="tasks_dir",
        required=True,
        metavar="DIR",
        help="DIR/<task>/test.jsonl (train.jsonl for -n)",
    )
    data.add_argument(
        "--task", dest="tasks", action="append", metavar="NAME", help="evaluate these tasks (default: all)"
    )
    composite = data.add_mutually_exclusive_group()
    composite.add_argument("--composite", metavar="FILE.jsonl", help="composite prompts (make-composite)")
    composite.add_argument("--composite-n", type=int, metavar="N", help="build composite-N prompts of --task")
    data.add_argument(
        "--composite-samples",
        type=int,
        default=EvalSpec.composite_samples,
        help="prompts built for --composite-n",
    )
    data.add_argument(
        "--composite-layout",
        choices=COMPOSITE_LAYOUTS,
        default=CompositeSettings.layout,
        help="how --composite-n prompts are written: reference (the reference's few-shot prefix) or "
        "numbered (the questions as numbered lines, for models trained on that format)",
    )
    add_field_flags(data, EvalSettings, ("limit",))
    data.add_argument("--metrics", metavar="FILE.json", help="task -> metrics overrides of the default table")
    gen = p.add_argument_group("generation")
    modes = EvalSettings.modes
    gen.add_argument(
        "--mode", nargs="+", default=list(modes), choices=MODES, help=f"default: {' '.join(modes)}"
    )
    add_field_flags(gen, EvalSettings, SETTINGS_FLAGS)
    gen.add_argument(
        "--seed", type=int, default=EvalSpec.seed, help="composite prompt sampling (--composite-n)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="results.json, report.md, predictions.jsonl")
    out.add_argument("--force", action="store_true", help="replace an existing --out")
    out.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> None:
    from meteora_jax.evaluation.eval_run import evaluate  # noqa: PLC0415

    base, adapters, gates = model_sources(args)
    inputs = [
        *model_inputs(args, base, adapters),
        ("--tasks", args.tasks_dir),
        ("--composite", args.composite),
    ]
    inputs += [("--metrics", args.metrics), ("--tokenizer", args.tokenizer)]
    settings = EvalSettings(
        modes=tuple(args.mode), limit=args.limit, **field_values(args, EvalSettings, SETTINGS_FLAGS)
    )
    spec = EvalSpec(
        base=base,
        adapters=adapters,
        gates=gates,
        settings=settings,
        inputs=tuple((flag, path) for flag, path in inputs if path is not None),
        **field_values(args, EvalSpec, SPEC_FLAGS),
    )
    written = evaluate(spec)
    print(f"wrote {', '.join(os.path.relpath(p) for p in written)}", file=sys.stderr)
