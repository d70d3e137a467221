"""`meteora-jax export`: a checkpoint's adapters as PEFT folders or the MeteoRA reference format."""

from __future__ import annotations

import argparse
import os

from tqdm import tqdm

from meteora_jax.errors import ConfigError
from meteora_jax.io import checkpoint, files, meteora_torch
from meteora_jax.io.peft_write import write_adapter
from meteora_jax.io.stacking import unstack_adapters


def register(subparsers) -> None:
    sub = subparsers
    export = sub.add_parser(
        "export", help="write a checkpoint's adapters as PEFT folders or the MeteoRA format"
    )
    export.add_argument("--ckpt", required=True, help="a meteora-jax checkpoint folder (its latest step)")
    export.add_argument(
        "--to",
        required=True,
        choices=("peft", "meteora-torch"),
        help="peft: one PEFT LoRA folder per adapter, OUT/<name>; meteora-torch: the reference "
        "model.safetensors + adapter_order.json",
    )
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    export.add_argument(
        "--base", help="the base folder (default: the one recorded in the checkpoint); checked by fingerprint"
    )
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    files.refuse_existing(args.out, force=args.force)
    ckpt = checkpoint.restore(args.ckpt)
    meta, where = ckpt.meta, f"{args.ckpt} (step {ckpt.step})"
    if args.to == "peft":
        if args.base is not None:
            checkpoint.check_base(meta, args.base, where)
        for name in meta.adapter_names:
            if name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
                raise ConfigError(
                    f"adapter name {name!r} in {where} cannot be used as a folder name under {args.out}"
                )
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
        return
    base = args.base if args.base is not None else meta.base_path
    if base is None or not os.path.isdir(base):
        raise FileNotFoundError(
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
