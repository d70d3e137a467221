"""`meteora-jax make-composite`: task folders -> a JSONL file of composite-n prompts.

Give the sub-tasks one way: `--preset` (a reference task list; all its folders must exist),
`--subtasks a,b,c` (in prompt order), or `--n N` (the preset of that size when its folders
exist, else N tasks drawn with the seed); `--n` may accompany `--subtasks` as a check of its
length. The file feeds `meteora-jax eval --composite FILE`.
"""

from __future__ import annotations

import argparse

from meteora_jax.commands.flags import add_field_flags
from meteora_jax.data import composite
from meteora_jax.errors import ConfigError
from meteora_jax.io import files

NAME = "make-composite"
HELP = "bundle n tasks' test questions into composite-n prompts (JSONL)"
DESCRIPTION = "Bundle the test questions of n tasks into composite-n prompts, one JSON line each."


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True, metavar="DIR", help="folder of TASK/train.jsonl, test.jsonl")
    p.add_argument(
        "--n", type=int, help="sub-tasks per prompt (the preset of that size if its folders exist)"
    )
    p.add_argument("--preset", choices=list(composite.PRESETS), help="the reference's task list")
    p.add_argument("--subtasks", metavar="A,B,C", help="the sub-tasks, comma-separated, in prompt order")
    add_field_flags(p, composite.CompositeSettings, ("samples", "seed", "layout"))
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _subtasks(args: argparse.Namespace) -> list[str] | None:
    """The sub-task list of --preset / --subtasks (None for --n alone); flag misuse refused."""
    if args.preset is not None:
        if args.n is not None or args.subtasks is not None:
            raise ConfigError("--preset names the sub-tasks: pass it without --n and --subtasks")
        return list(composite.PRESETS[args.preset])
    if args.subtasks is not None:
        names = [t.strip() for t in args.subtasks.split(",")]
        if not all(names):
            raise ConfigError(f"--subtasks {args.subtasks!r}: an empty task name (use a,b,c)")
        return names
    if args.n is None:
        raise ConfigError("name the sub-tasks: pass --n N, --preset NAME or --subtasks a,b,c")
    return None


def run(args: argparse.Namespace) -> None:
    inputs = [("--tasks", args.tasks)]
    files.check_output_path(args.out, inputs=inputs)
    files.refuse_existing(args.out, force=args.force, setting="--out")
    settings = composite.CompositeSettings(
        n=args.n, subtasks=_subtasks(args), samples=args.samples, seed=args.seed, layout=args.layout
    )
    names, how = composite.resolve_subtasks(args.tasks, settings)
    how = f"preset {args.preset}" if args.preset else how
    lines = composite.build_composite(
        args.tasks, subtasks=names, samples=settings.samples, seed=args.seed, layout=settings.layout
    )
    out = composite.write_composite(lines, args.out, force=args.force, inputs=inputs, setting="--out")
    over = ", ".join(names)
    print(f"wrote {out}: {len(lines)} composite-{len(names)} prompts over {over} ({how}; seed {args.seed})")
