"""`meteora-jax bench layer|model|generate|train`: MoE-LoRA cost against its baselines, side by side."""

from __future__ import annotations

import argparse
import dataclasses
import json

from meteora_jax.bench.decoding import GenerateBenchSettings, bench_generate, format_bench
from meteora_jax.bench.layer import LLAMA3_8B_LAYER, BenchSettings, bench
from meteora_jax.bench.model import ModelBenchSettings, bench_model
from meteora_jax.bench.server_load import ServeBenchSettings, bench_serve, format_serve
from meteora_jax.bench.train import TrainBenchSettings
from meteora_jax.config import LlamaConfig
from meteora_jax.errors import ConfigError
from meteora_jax.io.files import check_output_path, write_text_atomic
from meteora_jax.modeling.attention import IMPLEMENTATIONS
from meteora_jax.modeling.llama import REMAT_POLICIES
from meteora_jax.ops import BACKENDS

# `bench generate|model --shape`: the model each name builds (random weights: nothing is downloaded).
SHAPES = {
    "small": GenerateBenchSettings().llama(),
    "llama3-8b": dataclasses.replace(LLAMA3_8B_LAYER, vocab_size=8192, num_hidden_layers=32),
}


NAME = "bench"
HELP = "measure MoE-LoRA overhead vs the base model, one plain LoRA and the reference algorithm"
DESCRIPTION = "Ratios to the base model, median of interleaved repeats, all variants in one run."


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=("layer", "model", "generate", "serve", "train"),
        help="one LLaMA-3-8B decoder layer, a whole model through the public call, jitted generation "
        "(decode tokens/s), the serving engine under concurrent clients, or one gate-training step vs "
        "a plain-LoRA step",
    )
    # Unset flags leave each bench's own default (BenchSettings, GenerateBenchSettings,
    # TrainBenchSettings), shown in the help.
    layer, gen, train, srv = (
        BenchSettings(),
        GenerateBenchSettings(),
        TrainBenchSettings(),
        ServeBenchSettings(),
    )
    mixtures = " ".join(f"{n}x{r}" for n, r in train.mixtures)
    flags = {
        "--adapters": dict(type=int, help=f"adapters (default {layer.adapters})"),
        "--rank": dict(type=int, help=f"LoRA rank (default {layer.rank})"),
        "--top-k": dict(type=int, help=f"adapters per token (default {layer.top_k})"),
        "--tokens": dict(type=int, nargs="+", help=f"prefill token counts (layer, model: default "
                         f"{list(layer.prefill_tokens)}; train: the first, default {train.tokens})"),
        "--decode-tokens": dict(type=int, nargs="*",
                                help=f"decode step tokens (default {list(layer.decode_tokens)})"),
        "--decode-context": dict(type=int,
                                 help=f"cached tokens before a decode step ({layer.decode_context})"),
        "--backend": dict(nargs="+", choices=BACKENDS, help="MoE-LoRA backends to time (layer, model; "
                          "generate and train time the first; default auto)"),
        "--repeats": dict(type=int, help=f"timed repeats (default {layer.repeats})"),
        "--no-torch": dict(action="store_true", help="skip the torch reference algorithm"),
        "--base": dict(help="HF model folder whose config.json sizes the model (weights unused)"),
        "--batch": dict(type=int, nargs="+",
                        help=f"generate: batch sizes (default {list(gen.batch_sizes)})"),
        "--new-tokens": dict(type=int, help=f"generate, serve: tokens per run / request ({gen.new_tokens}, "
                             f"{srv.new_tokens})"),
        "--prompt-length": dict(type=int, help=f"generate, serve: prompt tokens ({gen.prompt_length}, "
                                f"{srv.prompt_length})"),
        "--clients": dict(type=int, nargs="+",
                          help=f"serve: concurrent clients (default {list(srv.clients)})"),
        "--mixtures": dict(nargs="+", metavar="LxR", help=f"train: adapters x rank (default {mixtures})"),
        "--layers": dict(type=int,
                         help="decoder layers (layer, train: default 1; generate: the shape's own)"),
        "--shape": dict(choices=tuple(SHAPES), help="generate, serve, model: the model's shape instead of "
                        "--base: small (hidden 512, 4 layers; the default) or llama3-8b (LLaMA-3-8B layers "
                        "with an 8192-token vocabulary; give --layers)"),
        "--remat": dict(choices=tuple(REMAT_POLICIES), help=f"train: remat policy (default {train.remat})"),
        "--attention": dict(choices=IMPLEMENTATIONS, help=f"train: attention (default {train.attention})"),
        "--memory-only": dict(action="store_true", help="train: compile and report peak memory, no timing"),
        "--json": dict(help="also write the results to this JSON file"),
    }  # fmt: skip
    for flag, options in flags.items():
        p.add_argument(flag, **options)


def run(args: argparse.Namespace) -> None:
    if args.json is not None:  # refused now, not after minutes of timing
        check_output_path(args.json, inputs=[("--base", args.base)], setting="--json")
    if args.layers is not None and args.layers < 1:
        raise ConfigError(f"--layers must be at least 1, got {args.layers}")
    if args.shape is not None and args.base:
        raise ConfigError(f"--shape and --base both size the model (--base {args.base}); give one")
    if args.shape is not None and args.what not in ("generate", "serve", "model"):
        raise ConfigError(f"--shape sizes `bench generate|serve|model`, not `bench {args.what}`")
    if args.what in ("generate", "serve"):
        return run_generate(args)
    if args.what == "train":
        return run_train(args)
    if args.what == "model":
        return run_model(args)
    config = LlamaConfig.from_hf(args.base) if args.base else LLAMA3_8B_LAYER
    config = dataclasses.replace(config, num_hidden_layers=args.layers or 1, vocab_size=256)
    # Without torch, `bench` raises a ConfigError that names the install command and --no-torch.
    torch_reference = not args.no_torch
    settings = BenchSettings(
        **given(
            adapters=args.adapters,
            rank=args.rank,
            top_k=args.top_k,
            prefill_tokens=args.tokens and tuple(args.tokens),
            decode_tokens=None if args.decode_tokens is None else tuple(args.decode_tokens),
            decode_context=args.decode_context,
            backends=args.backend and tuple(args.backend),
            repeats=args.repeats,
        ),
        torch_reference=torch_reference,
    )
    rows = bench(config, settings)
    if args.json:
        payload = {"what": args.what, "config": config.to_hf_dict(), "settings": dataclasses.asdict(settings),
                   "results": rows}  # fmt: skip
        write_json(payload, args.json)


def given(**values) -> dict:
    """The flags the user gave (not None): the rest keep the settings' own defaults."""
    return {name: value for name, value in values.items() if value is not None}


def write_json(payload, path: str) -> None:
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    write_text_atomic(path, json.dumps(payload, indent=2))


def run_model(args: argparse.Namespace) -> None:
    """The whole model through the public call, its plain program, and torch's, side by side."""
    config = LlamaConfig.from_hf(args.base) if args.base else SHAPES[args.shape or "small"]
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    settings = ModelBenchSettings(
        **given(
            adapters=args.adapters,
            rank=args.rank,
            top_k=args.top_k,
            tokens=args.tokens and tuple(args.tokens),
            backend=args.backend and args.backend[0],
            repeats=args.repeats,
        ),
        torch_reference=not args.no_torch,
    )
    rows = bench_model(config, settings)
    if args.json:
        write_json({"what": "model", "config": config.to_hf_dict(), "settings": dataclasses.asdict(settings),
                    "results": rows}, args.json)  # fmt: skip


def run_generate(args: argparse.Namespace) -> None:
    """Decode tokens/s and prefill time of a MeteoRA model vs its base, batch by batch (generate),
    or the serving engine's tokens/s and time to first token by concurrent clients (serve)."""
    config = LlamaConfig.from_hf(args.base) if args.base else SHAPES[args.shape or "small"]
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    overrides = {f: getattr(config, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads")}  # fmt: skip
    settings = GenerateBenchSettings(
        **given(
            num_adapters=args.adapters,
            rank=args.rank,
            top_k=args.top_k,
            prompt_length=None if args.what == "serve" else args.prompt_length,
            new_tokens=None if args.what == "serve" else args.new_tokens,
            batch_sizes=args.batch and tuple(args.batch),
            repeats=args.repeats,
            backend=args.backend and args.backend[0],
        ),
        **overrides,
    )
    if args.what == "serve":
        serve = ServeBenchSettings(
            **given(
                clients=args.clients and tuple(args.clients), prompt_length=args.prompt_length,
                new_tokens=args.new_tokens, repeats=args.repeats,
            )
        )  # fmt: skip
        report = bench_serve(settings, serve)
        print(format_serve(report))
        if args.json:
            write_json({"what": "serve", **report}, args.json)
        return
    report = bench_generate(settings)
    print(format_bench(report))
    if args.json:
        write_json({"what": "generate", "results": report}, args.json)


def _mixture(text: str) -> tuple[int, int]:
    adapters, sep, rank = text.partition("x")
    if not sep or not adapters.isdigit() or not rank.isdigit():
        raise ConfigError(f"--mixtures {text!r}: expected ADAPTERSxRANK, e.g. 28x8")
    return int(adapters), int(rank)


def run_train(args: argparse.Namespace) -> None:
    """One gate-training step (gates only, and with adapters) vs one plain-LoRA step, per mixture."""
    from meteora_jax.bench.train import bench_train  # noqa: PLC0415

    config = LlamaConfig.from_hf(args.base) if args.base else LLAMA3_8B_LAYER
    config = dataclasses.replace(config, num_hidden_layers=args.layers or 1, vocab_size=256)
    settings = TrainBenchSettings(
        **given(
            mixtures=args.mixtures and tuple(_mixture(m) for m in args.mixtures),
            lora_rank=args.rank,
            top_k=args.top_k,
            tokens=args.tokens and args.tokens[0],
            repeats=args.repeats,
            backend=args.backend and args.backend[0],
            remat=args.remat,
            attention=args.attention,
        ),
        memory_only=args.memory_only,
    )
    rows = bench_train(config, settings)
    if args.json:
        write_json({"what": "train", "config": config.to_hf_dict(), "settings": dataclasses.asdict(settings),
                    "results": rows}, args.json)  # fmt: skip
