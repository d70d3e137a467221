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

from meteora_jax.commands import add_model_flags, model_sources
from meteora_jax.commands.flags import add_field_flags, field_values
from meteora_jax.serving.options import FLAGS, ServeSettings
from meteora_jax.sharding import make_mesh, parse_mesh

NAME = "serve"
HELP = "serve the fused model over an OpenAI-compatible HTTP API"
DESCRIPTION = "Serve a MeteoRA model (or its base) at /v1/completions and /v1/chat/completions."


def add_flags(p: argparse.ArgumentParser) -> None:
    model = add_model_flags(p)
    model.add_argument(
        "--mesh", metavar="data=N,fsdp=N,tensor=N",
        help="shard the model over this device mesh (default: one device; the slots are replicated)",
    )  # fmt: skip
    model.add_argument(
        "--name", help="the model id clients name (default: the checkpoint's or base's folder name)"
    )
    add_field_flags(p.add_argument_group("server"), ServeSettings, FLAGS)


def run(args: argparse.Namespace) -> None:
    """The `serve` handler."""
    import uvicorn  # noqa: PLC0415

    from meteora_jax.api import load_model  # noqa: PLC0415
    from meteora_jax.data.prompts import load_tokenizer, pad_token_of  # noqa: PLC0415
    from meteora_jax.serving.app import Server  # noqa: PLC0415
    from meteora_jax.serving.engine import Engine  # noqa: PLC0415
    from meteora_jax.text import stop_ids  # noqa: PLC0415

    settings = ServeSettings(**field_values(args, ServeSettings, FLAGS))
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    base, adapters, gates = model_sources(args)
    model = load_model(base, adapters=adapters, gates=gates, dtype=args.dtype, mesh=mesh)
    max_length = settings.length_for(model.config.max_position_embeddings)
    tokenizer = load_tokenizer(args.tokenizer or base)
    engine = Engine(
        model,
        slots=settings.slots,
        max_length=max_length,
        max_queue=settings.max_queue,
        pad_id=pad_token_of(tokenizer),
    )
    started = time.perf_counter()
    programs = engine.program_count
    print(
        f"compiling {programs} programs ({settings.slots} slots, max length {max_length})",
        file=sys.stderr,
    )
    engine.warm_up()
    print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    name = args.name or os.path.basename(os.path.normpath(args.ckpt or base))
    server = Server(model, tokenizer, engine, name=name, eos_ids=stop_ids(model, tokenizer))
    engine.start()
    config = uvicorn.Config(
        server.app, host=settings.host, port=settings.port, timeout_graceful_shutdown=settings.grace,
        log_level="info",
    )  # fmt: skip
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: make that one a
    # clean exit, so the engine is stopped and the status is 0.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop(timeout=settings.grace)


def _exit_cleanly(signum, frame):
    raise SystemExit(0)
