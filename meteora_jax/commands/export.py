"""`meteora-jax export`: a checkpoint's adapters as PEFT folders or the MeteoRA reference format."""

from __future__ import annotations

import argparse
import os

from tqdm import tqdm

from meteora_jax.commands import checkpoint_folder
from meteora_jax.errors import MissingFileError
from meteora_jax.inputs import validate_adapter_name
from meteora_jax.io import checkpoint, files, meteora_torch
from meteora_jax.io.peft_write import write_adapter
from meteora_jax.io.stacking import unstack_adapters

NAME = "export"
HELP = "write a checkpoint's adapters as PEFT folders or the MeteoRA format"
DESCRIPTION = "Write a checkpoint's adapters back out: as PEFT folders, or in the MeteoRA reference's format."


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a meteora-jax checkpoint folder (its latest step)")
    p.add_argument(
        "--to",
        required=True,
        choices=("peft", "meteora-torch"),
        help="peft: one PEFT LoRA folder per adapter, OUT/<name>; meteora-torch: the reference "
        "model.safetensors + adapter_order.json",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument(
        "--base", help="the base folder (default: the one recorded in the checkpoint); checked by fingerprint"
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> None:
    files.check_output_path(args.out, inputs=[("--ckpt", args.ckpt), ("--base", args.base)])
    files.refuse_existing(args.out, force=args.force, setting="--out")
    step, meta = checkpoint.read_meta(checkpoint_folder(args.ckpt))
    where = f"{args.ckpt} (step {step})"
    # The base recorded in the checkpoint is an input too, even when this export does not read it.
    files.check_output_path(args.out, inputs=[("the base recorded in --ckpt", meta.base_path)])
    for name in meta.adapter_names:
        validate_adapter_name(name, where=f"checkpoint {where}")
    ckpt = checkpoint.restore(args.ckpt, step)
    if args.to == "peft":
        _export_peft(args, ckpt, where)
    else:
        _export_reference(args, ckpt, where)


def _export_peft(args: argparse.Namespace, ckpt: checkpoint.Checkpoint, where: str) -> None:
    """One PEFT LoRA folder per adapter, `--out/<name>`."""
    meta = ckpt.meta
    if args.base is not None:
        checkpoint.check_base(meta, args.base, where)
    adapters = unstack_adapters(ckpt.params, list(meta.adapters))
    with files.staged_directory(args.out, force=args.force) as tmp:
        for adapter in tqdm(adapters, desc="writing PEFT adapters", unit="adapter", disable=None):
            write_adapter(
                adapter,
                os.path.join(tmp, adapter.name),
                base_model_name_or_path=meta.base_path,
                config=meta.base_config,
            )
    print(
        f"wrote {len(adapters)} PEFT adapters under {os.path.abspath(args.out)}: "
        f"{', '.join(meta.adapter_names)}"
    )


def _export_reference(args: argparse.Namespace, ckpt: checkpoint.Checkpoint, where: str) -> None:
    """The MeteoRA reference `model.safetensors` (base tensors copied) and `adapter_order.json`."""
    meta = ckpt.meta
    base = args.base if args.base is not None else meta.base_path
    if base is None or not os.path.isdir(base):
        raise MissingFileError(
            f"the base model {base} recorded in {where} is not there: pass the base folder with --base"
        )
    checkpoint.check_base(meta, base, where)
    out = meteora_torch.write_reference_params(
        ckpt.params, meta.moe(), meta.adapters, base, args.out, force=args.force
    )
    print(
        f"wrote {os.path.join(out, meteora_torch.WEIGHTS_FILE)} and {meteora_torch.ORDER_FILE} "
        f"(adapter order: {', '.join(meta.adapter_names)})"
    )
