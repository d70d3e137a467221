"""`meteora-jax serve`: the fused model behind an OpenAI-compatible HTTP API (`meteora_jax.serving`).

Loads the model, compiles every program the traffic will run (one prefill per prompt bucket, one
decode step, one cache compaction), then serves on 127.0.0.1 unless told otherwise. SIGTERM or
Ctrl-C stops taking requests and lets the running ones finish within `--grace` seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from meteora_jax.commands import add_model_flags, add_runtime_flags, model_sources
from meteora_jax.errors import ConfigError
from meteora_jax.sharding import make_mesh, parse_mesh


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `serve` subcommand (handler: `run`) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve",
        help="serve the fused model over an OpenAI-compatible HTTP API",
        description="Serve a MeteoRA model (or its base) at /v1/completions and /v1/chat/completions.",
    )
    model = add_model_flags(p)
    add_runtime_flags(model)
    model.add_argument(
        "--mesh", metavar="data=N,fsdp=N,tensor=N",
        help="shard the model over this device mesh (default: one device; the slots are replicated)",
    )  # fmt: skip
    model.add_argument(
        "--name", help="the model id clients name (default: the checkpoint's or base's folder name)"
    )
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    server.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    server.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="prompt + answer tokens of one request at most (default 2048)",
    )
    server.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot at most (default 64)"
    )
    server.add_argument(
        "--grace", type=float, default=30.0, help="seconds running requests get on SIGTERM (default 30)"
    )
    p.set_defaults(func=run)
    return p


def _check(args) -> None:
    for name in ("slots", "max_length", "max_queue"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length < 2:
        raise ConfigError(
            f"--max-length must be >= 2 (a prompt token and an answer token), got {args.max_length}"
        )
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must lie in [0, 65536), got {args.port}")
    if args.grace < 0:
        raise ConfigError(f"--grace must be >= 0, got {args.grace}")


def run(args: argparse.Namespace) -> None:
    """The `serve` handler."""
    import uvicorn  # noqa: PLC0415

    from meteora_jax.api import load_model  # noqa: PLC0415
    from meteora_jax.data.prompts import load_tokenizer, pad_token_of  # noqa: PLC0415
    from meteora_jax.serving.app import Server  # noqa: PLC0415
    from meteora_jax.serving.engine import Engine  # noqa: PLC0415
    from meteora_jax.text import stop_ids  # noqa: PLC0415

    _check(args)
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    base, adapters, gates = model_sources(args)
    model = load_model(base, adapters=adapters, gates=gates, dtype=args.dtype, mesh=mesh)
    limit = model.config.max_position_embeddings
    if args.max_length > limit:
        raise ConfigError(
            f"--max-length {args.max_length} exceeds the model's max_position_embeddings={limit}"
        )
    tokenizer = load_tokenizer(args.tokenizer or base)
    engine = Engine(
        model,
        slots=args.slots,
        max_length=args.max_length,
        max_queue=args.max_queue,
        pad_id=pad_token_of(tokenizer),
    )
    started = time.perf_counter()
    programs = engine.program_count
    print(
        f"compiling {programs} programs ({args.slots} slots, --max-length {args.max_length})", file=sys.stderr
    )
    engine.warm_up()
    print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    name = args.name or os.path.basename(os.path.normpath(args.ckpt or base))
    server = Server(model, tokenizer, engine, name=name, eos_ids=stop_ids(model, tokenizer))
    engine.start()
    config = uvicorn.Config(
        server.app, host=args.host, port=args.port, timeout_graceful_shutdown=args.grace, log_level="info",
    )  # fmt: skip
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: make that one a
    # clean exit, so the engine is stopped and the status is 0.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop(timeout=args.grace)


def _exit_cleanly(signum, frame):
    raise SystemExit(0)
