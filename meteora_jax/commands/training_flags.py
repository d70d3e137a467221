"""The command-line flags `train-gate` and `train-lora` share (data, optimisation, run, hosts),
declared once, and the settings objects they become."""

from __future__ import annotations

import argparse

from meteora_jax.data.pipeline import DataConfig
from meteora_jax.data.samples import LM_LOSSES
from meteora_jax.modeling.attention import IMPLEMENTATIONS
from meteora_jax.modeling.llama import REMAT_POLICIES
from meteora_jax.ops.moe_lora import BACKENDS
from meteora_jax.sharding import DEFAULT_MESH, parse_mesh
from meteora_jax.training.config import COMPUTE_DTYPES, TRAIN_BACKEND, TrainConfig


def add_training_flags(
    p: argparse.ArgumentParser, *, lr: float, clip_norm: float, lm_loss: str, eval_what: str
) -> dict[str, argparse._ArgumentGroup]:
    """Adds the shared flags in groups "model", "data", "optimisation", "run" and "several hosts"
    (returned, for a command's own flags); the defaults that differ come as arguments."""
    groups = {
        "model": p.add_argument_group("model"),
        "data": p.add_argument_group("data"),
        "optimisation": p.add_argument_group("optimisation"),
        "run": p.add_argument_group("run"),
        "hosts": p.add_argument_group("several hosts (omit on TPU pods / SLURM: auto-detected)"),
    }
    model = groups["model"]
    model.add_argument("--base", required=True, metavar="DIR", help="the HF LLaMA base folder")
    model.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    model.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES), help="decoder-layer remat")
    add_loss_chunk_flag(model)
    data = groups["data"]
    data.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="slots per row (default 512); samples it would cut are refused or warned about before training",
    )
    data.add_argument("--batch-size", type=int, default=8, help="rows of the global batch (default 8)")
    data.add_argument("--no-packing", dest="packing", action="store_false", help="one sample per row")
    data.add_argument(
        "--lm-loss",
        default=lm_loss,
        choices=LM_LOSSES,
        help=f"LM loss on all tokens or the response only (default {lm_loss})",
    )
    opt = groups["optimisation"]
    opt.add_argument("--steps", type=int, default=1000)
    opt.add_argument("--lr", type=float, default=lr, help=f"peak AdamW learning rate (default {lr:g})")
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--decay-steps", type=int, help="cosine horizon (default --steps)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument(
        "--clip-norm",
        type=float,
        default=clip_norm,
        help=f"global grad-norm clip (0: off; default {clip_norm:g})",
    )
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    opt.add_argument("--seed", type=int, default=0)
    run = groups["run"]
    run.add_argument("--force", action="store_true", help="replace an --out that is not a run of ours")
    run.add_argument("--save-every", type=int, default=100)
    run.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    run.add_argument("--eval-every", type=int, default=0, help=f"{eval_what} every N steps (0: at the end)")
    run.add_argument("--log-every", type=int, default=1)
    run.add_argument(
        "--new-data",
        action="store_true",
        help="resume a run whose data or data settings changed: weights and optimizer go on, the data "
        "stream starts afresh",
    )
    mesh = ",".join(f"{axis}={size}" for axis, size in DEFAULT_MESH.items())
    run.add_argument("--mesh", default=mesh, metavar="data=N,fsdp=N,tensor=N", help=f"(default {mesh})")
    run.add_argument(
        "--backend",
        default=TRAIN_BACKEND,
        choices=BACKENDS,
        help=f"MoE-LoRA backend (default {TRAIN_BACKEND})",
    )
    run.add_argument(
        "--attention",
        default="auto",
        choices=IMPLEMENTATIONS,
        help="attention implementation (default auto: cuDNN flash on GPU in bf16, splash on TPU, else XLA)",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false")
    hosts = groups["hosts"]
    hosts.add_argument("--coordinator", metavar="HOST:PORT")
    hosts.add_argument("--num-processes", type=int)
    hosts.add_argument("--process-id", type=int)
    return groups


def add_loss_chunk_flag(group) -> None:
    """`--loss-chunk`, the one flag of `TrainConfig.loss_chunk` (training and `compile`)."""
    group.add_argument(
        "--loss-chunk",
        type=int,
        default=TrainConfig.loss_chunk,
        metavar="SLOTS",
        help=f"slots per row the LM loss takes logits of at once (default {TrainConfig.loss_chunk}; 0: all)",
    )


def train_settings(args: argparse.Namespace) -> dict:
    """The shared `TrainConfig` fields of parsed flags (a command adds its own)."""
    return {
        "steps": args.steps,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "decay_steps": args.decay_steps,
        "weight_decay": args.weight_decay,
        "clip_norm": args.clip_norm,
        "grad_accum": args.grad_accum,
        "remat": args.remat,
        "loss_chunk": args.loss_chunk,
        "dtype": args.dtype,
        "seed": args.seed,
        "save_every": args.save_every,
        "keep": args.keep,
        "eval_every": args.eval_every,
        "log_every": args.log_every,
        "new_data": args.new_data,
    }


def data_config(args: argparse.Namespace, task_sampling: str = "proportional") -> DataConfig:
    return DataConfig(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        packing=args.packing,
        lm_loss=args.lm_loss,
        task_sampling=task_sampling,
        seed=args.seed,
    )


def run_settings(args: argparse.Namespace) -> dict:
    """The shared run fields of a spec (`RunSpec`, `LoRASpec`)."""
    return {
        "out": args.out,
        "mesh": parse_mesh(args.mesh),
        "backend": args.backend,
        "attention": args.attention,
        "force": args.force,
        "progress": args.progress,
    }


def join_processes(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from the host flags (or the cluster's environment)."""
    from meteora_jax.training.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
