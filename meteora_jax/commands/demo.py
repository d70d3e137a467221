"""`meteora-jax demo`: MeteoRA end to end on the embedded tasks (tiny model, CPU, nothing downloaded)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from meteora_jax.demo.stages import DemoSettings, run_demo
from meteora_jax.demo.summary import report_path

CACHE_DIR = "xla-cache"  # under --out


NAME = "demo"
HELP = "MeteoRA end to end: a tiny base, one adapter per task, gates, evaluation, a report"
DESCRIPTION = (
    "Builds a tiny LLaMA pre-trained to follow the prompt format, trains one LoRA adapter per "
    "synthetic task (train-lora), fuses them and trains the gates (train-gate), then evaluates "
    "base / own adapter / MeteoRA / averaged adapters on each task and on composite-3 prompts. "
    "Finished stages are cached: a rerun skips them, a changed setting reruns what depends on it."
)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="the demo folder (default %(default)s)")
    p.add_argument(
        "--fast", action="store_true", help="tiny sizes and a few steps: a quick look, not results"
    )
    p.add_argument(
        "--force", action="store_true", help="start over (and replace an --out that is not a demo folder)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--gate-seed", type=int, default=DemoSettings.gate_seed, metavar="N",
        help="seed of both gate runs (start, dropout, data order); the base and adapters stay cached "
        "(default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--gate-routing-noise", type=float, default=DemoSettings.gate_routing_noise, metavar="X",
        help="Gumbel noise scale of the paper recipe's top-k choice (train-gate --routing-noise; "
        "default %(default)s)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> None:
    settings = DemoSettings.fast() if args.fast else DemoSettings()
    settings = dataclasses.replace(
        settings, gate_seed=args.gate_seed, gate_routing_noise=args.gate_routing_noise
    )
    use_compile_cache(args.out)
    run_demo(args.out, settings, force=args.force, progress=not args.no_progress)
    with open(report_path(args.out), encoding="utf-8") as f:
        print(f.read())
    print(f"report: {report_path(args.out)}", file=sys.stderr)


def use_compile_cache(out: str) -> None:
    """Keeps compiled programs in OUT/xla-cache: the adapters' training runs build one program
    five times over, the two MeteoRA evaluations share theirs, and a rerun finds them all. A
    cache JAX already has (`JAX_COMPILATION_CACHE_DIR`, a caller's) is left in place."""
    import jax  # noqa: PLC0415

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out), CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
