"""`meteora-jax train-gate`: train the MeteoRA gates (optionally the adapters) on task folders."""

from __future__ import annotations

import argparse

from meteora_jax.commands import adapter_specs
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.samples import LM_LOSSES
from meteora_jax.data.sampling import TASK_SAMPLINGS
from meteora_jax.modeling.llama import REMAT_POLICIES
from meteora_jax.sharding import parse_mesh
from meteora_jax.training.config import COMPUTE_DTYPES, TrainConfig


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-gate",
        help="train the gates of a MeteoRA mixture on task folders (resumes a run in --out)",
        description="Train MeteoRA gates: loss = LM CE + W * gate CE. Rerunning the same command resumes.",
    )
    model = p.add_argument_group("model")
    model.add_argument("--base", required=True, metavar="DIR", help="the HF LLaMA base folder")
    model.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="a PEFT adapter folder; repeat in gate order (its name matches a task folder)",
    )
    model.add_argument("--train-adapters", action="store_true", help="train the LoRA stacks as well")
    model.add_argument("--top-k", type=int, default=2, help="adapters per token (default 2)")
    model.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    model.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES), help="decoder-layer remat")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="DIR", help="DIR/<task>/train.jsonl (and test.jsonl)")
    data.add_argument("--tasks", nargs="+", metavar="NAME", help="train on these tasks only")
    data.add_argument("--seq-len", type=int, default=512, help="slots per row (default 512)")
    data.add_argument("--batch-size", type=int, default=8, help="rows of the global batch (default 8)")
    data.add_argument("--no-packing", dest="packing", action="store_false", help="one sample per row")
    data.add_argument(
        "--lm-loss", default="all", choices=LM_LOSSES, help="LM loss on all tokens or the response"
    )
    data.add_argument("--task-sampling", default="proportional", choices=TASK_SAMPLINGS)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000)
    opt.add_argument("--lr", type=float, default=5e-4)
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--decay-steps", type=int, help="cosine horizon (default --steps)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--clip-norm", type=float, default=0.3, help="global grad-norm clip (0: off)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    opt.add_argument("--gate-loss-weight", type=float, default=50.0)
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR", help="the run folder (a meteora-jax checkpoint)")
    run.add_argument("--force", action="store_true", help="replace an --out that is not a run of ours")
    run.add_argument("--save-every", type=int, default=100)
    run.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    run.add_argument(
        "--eval-every", type=int, default=0, help="held-out routing every N steps (0: at the end)"
    )
    run.add_argument("--log-every", type=int, default=1)
    run.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", metavar="data=N,fsdp=N,tensor=N")
    run.add_argument("--backend", default="xla", help="MoE-LoRA backend (default xla: the dense path)")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    multi = p.add_argument_group("several hosts (omit on TPU pods / SLURM: auto-detected)")
    multi.add_argument("--coordinator", metavar="HOST:PORT")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    p.set_defaults(func=run_command)
    return p


def spec_from_args(args: argparse.Namespace):
    """The `RunSpec` a parsed command line describes."""
    from meteora_jax.training.loop import RunSpec

    train = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        grad_accum=args.grad_accum,
        gate_loss_weight=args.gate_loss_weight,
        train_adapters=args.train_adapters,
        remat=args.remat,
        dtype=args.dtype,
        top_k=args.top_k,
        seed=args.seed,
        save_every=args.save_every,
        keep=args.keep,
        eval_every=args.eval_every,
        log_every=args.log_every,
    )
    data = DataConfig(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        packing=args.packing,
        lm_loss=args.lm_loss,
        task_sampling=args.task_sampling,
        seed=args.seed,
    )
    return RunSpec(
        base=args.base,
        adapters=adapter_specs(args.adapter),
        data_dir=args.data,
        out=args.out,
        train=train,
        data=data,
        mesh=parse_mesh(args.mesh),
        tasks=args.tasks,
        backend=args.backend,
        force=args.force,
        progress=args.progress,
    )


def run_command(args: argparse.Namespace) -> None:
    from meteora_jax.training.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    from meteora_jax.training.loop import train

    result = train(spec_from_args(args))
    if result.evaluation:
        e = result.evaluation
        print(
            f"held-out routing: dominant adapter right for {e['dominant_accuracy']:.1%} of {e['prompts']} "
            f"prompts; last layer {e['last_layer_accuracy']:.1%} of tokens"
        )
    print(f"wrote {result.out} (step {result.step})")
