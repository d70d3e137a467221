"""Subcommands of the `meteora-jax` command line, one module each, wired in by `meteora_jax.cli`.

Each module declares its subcommand's `NAME`, `HELP` (and `DESCRIPTION`), `add_flags(parser)` and
the handler `run(args)`; handlers raise `MeteoRAError` for `run_reporting` to print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from meteora_jax.errors import ConfigError, MeteoRAError, MissingFileError, describe_os_error, storage_error
from meteora_jax.inputs import validate_adapter_name
from meteora_jax.training.stopping import RunStopped, sigterm_raises

# OS errors a user causes (a path that is missing, taken, of the wrong kind or not theirs): reported
# like a MeteoRAError, in case a library call below ours raises one before we could check.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def add_command(subparsers, command) -> argparse.ArgumentParser:
    """Adds the subcommand a command module declares (`NAME`, `HELP`, `DESCRIPTION`, `add_flags`,
    `run`) to an argparse subparsers object."""
    p = subparsers.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
    command.add_flags(p)
    p.set_defaults(func=command.run)
    return p


def run_reporting(args: argparse.Namespace) -> int:
    """Runs `args.func(args)`; a user error becomes one line on stderr and exit code 2, never a
    traceback; Ctrl-C or SIGTERM one line (with what a training run kept) and the shell's exit
    code (128 + the signal)."""
    try:
        with sigterm_raises():
            args.func(args)
    except RunStopped as e:
        print(f"meteora-jax {args.command}: stopped by {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"meteora-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except MeteoRAError as e:
        return _report(args.command, str(e))
    except USER_OS_ERRORS as e:
        return _report(args.command, describe_os_error(e))
    except Exception as e:
        storage = storage_error(e)
        if storage is None:
            raise
        return _report(args.command, describe_os_error(storage))
    return 0


def _report(command: str, message: str) -> int:
    message = " ".join(message.split("\n"))
    print(f"meteora-jax {command}: error: {message}", file=sys.stderr)
    return 2


def adapter_specs(specs: list[str], option: str = "--adapter") -> dict[str, str]:
    """`[NAME=]DIR` arguments -> {name: folder}, in order; a name defaults to the folder's name.

    Each name is checked here (`validate_adapter_name`), where it enters, so a bad one fails
    before anything is read.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or os.sep in name or (os.altsep and os.altsep in name):
            name, folder = os.path.basename(os.path.normpath(os.path.abspath(spec))), spec
        validate_adapter_name(name, where=f"{option} {folder}")
        if name in out:
            raise ConfigError(
                f"{option}: two adapters are named {name!r} ({out[name]}, {folder}); use NAME=DIR"
            )
        out[name] = folder
    return out


def checkpoint_folder(path: str, option: str = "--ckpt") -> str:
    """`path` if it is a folder (a checkpoint's); otherwise an error saying what it is instead."""
    if os.path.isfile(path):
        raise ConfigError(
            f"{option} {path} is a file, not a checkpoint folder (pass the folder that "
            "`meteora-jax convert` or training wrote)"
        )
    if not os.path.isdir(path):
        raise MissingFileError(f"{option} {path} does not exist")
    return path


def add_adapter_flag(group, *, required: bool = False, note: str = "") -> None:
    """`--adapter [NAME=]DIR`, repeated in gate order (`adapter_specs` reads it): the one
    declaration every command naming PEFT adapters shares; `note` adds to its help."""
    group.add_argument(
        "--adapter",
        action="append",
        required=required,
        default=None if required else [],
        metavar="[NAME=]DIR",
        help="a PEFT adapter folder; repeat in gate order" + (f" ({note})" if note else ""),
    )


def add_model_flags(p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] | None = None):
    """The flags naming a model to run (a checkpoint, or a base with adapters and gates) and how
    to run it (--tokenizer, --dtype), in a "model" group (returned, for a command's own model
    flags). `dtypes`: the compute dtypes the command allows (default: every one `load_model` takes)."""
    from meteora_jax.api import DEFAULT_DTYPE, DTYPES  # noqa: PLC0415 (jax loads with it)

    model = p.add_argument_group("model")
    model.add_argument("--ckpt", help="a meteora-jax checkpoint folder (its base folder is read from it)")
    model.add_argument("--base", metavar="DIR", help="the HF LLaMA base folder (overrides the checkpoint's)")
    add_adapter_flag(model)
    model.add_argument(
        "--gates", metavar="FILE|CKPT", help="trained gates: MeteoRA model.safetensors or a checkpoint"
    )
    model.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the base folder)")
    model.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=dtypes or tuple(DTYPES),
        help=f"compute dtype (default {DEFAULT_DTYPE})",
    )
    return model


def checkpoint_base(ckpt: str) -> str:
    """The base folder recorded in a checkpoint's metadata (MissingFileError if it is gone)."""
    from meteora_jax.io import checkpoint  # noqa: PLC0415

    step, meta = checkpoint.read_meta(ckpt)
    if meta.base_path is None or not os.path.isdir(meta.base_path):
        raise MissingFileError(
            f"the base model {meta.base_path} recorded in {ckpt} (step {step}) is not there: "
            "pass it with --base"
        )
    return meta.base_path


def model_sources(args: argparse.Namespace) -> tuple[str, dict[str, str] | None, str | None]:
    """(base folder, adapters {name: folder} or None, gates) of `add_model_flags`' flags: --ckpt,
    or --base [--adapter ...] [--gates]."""
    adapters = adapter_specs(args.adapter) if args.adapter else None
    if args.ckpt is not None:
        if args.gates is not None:
            raise ConfigError("--ckpt and --gates both name trained gates: pass one of them")
        checkpoint_folder(args.ckpt)
        return (args.base or checkpoint_base(args.ckpt)), adapters, args.ckpt
    if args.base is None:
        raise ConfigError("no model: pass --ckpt CKPT, or --base DIR (with --adapter / --gates for MeteoRA)")
    return args.base, adapters, args.gates


def model_inputs(
    args: argparse.Namespace, base: str, adapters: dict[str, str] | None
) -> list[tuple[str, str]]:
    """The (flag, path) inputs of a model given by `add_model_flags`, for `check_output_path`."""
    return [
        ("--ckpt", args.ckpt),
        ("--base" if args.base else "the base recorded in --ckpt", base),
        *(("--adapter", folder) for folder in (adapters or {}).values()),
        ("--gates", args.gates),
    ]
