"""`meteora-jax generate`: text in, text out, with an optional token-level routing view.

One prompt (`--prompt`) streams its tokens to the terminal as they are decoded; a JSONL file of
prompts (`--prompts`) runs in batches through the jitted decode loop and prints one JSON line
per prompt. `--routing-html` / `--routing-png` / `--routing-json` save which adapters the gates
chose for every prompt and generated token (`meteora_jax.viz`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from meteora_jax.commands import (
    add_command,
    add_model_flags,
    model_inputs,
    model_sources,
    run_reporting,
)
from meteora_jax.commands.flags import add_field_flags, field_values
from meteora_jax.errors import ConfigError, MissingFileError
from meteora_jax.generation import GenerationSettings
from meteora_jax.inputs import check_text

SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "no_repeat_ngram_size")
OUTPUTS = ("--out", "--routing-html", "--routing-png", "--routing-json")


NAME = "generate"
HELP = "generate text with a fused MeteoRA model (or its base), optionally saving the routing view"
DESCRIPTION = "Generate text; streams a single --prompt, batches a --prompts JSONL file."


def add_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    text = p.add_argument_group("prompts")
    source = text.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (streamed to the terminal)")
    source.add_argument(
        "--prompts", metavar="FILE.jsonl", help='one {"prompt": ...} per line; prints JSON lines'
    )
    text.add_argument(
        "--raw", action="store_true", help="use prompts as given (default: [INST] ... [/INST] format)"
    )
    text.add_argument(
        "--batch-size", type=int, default=8, help="prompts per batch with --prompts (default 8)"
    )
    text.add_argument("--out", metavar="FILE.jsonl", help="write --prompts results here instead of stdout")
    sampling = p.add_argument_group("sampling")
    add_field_flags(sampling, GenerationSettings, SAMPLING_FLAGS)
    routing = p.add_argument_group("routing")
    routing.add_argument("--top-k-adapters", type=int, help="adapters per token (default: the model's)")
    routing.add_argument(
        "--routing-temperature", type=float, help="gate softmax temperature (default: the model's)"
    )
    routing.add_argument(
        "--force-adapter", metavar="NAME", help="use this adapter for every token, bypassing gates"
    )
    routing.add_argument("--routing-html", metavar="FILE", help="write the token-level routing view (HTML)")
    routing.add_argument(
        "--routing-png", metavar="FILE", help="write a heatmap of the first prompt's routing (PNG)"
    )
    routing.add_argument(
        "--routing-json", metavar="FILE", help="write every token's routing, all layers (JSON)"
    )


def _check_paths(args, base: str, adapters: dict[str, str] | None) -> None:
    """Refuses, before the model loads, a missing --prompts file and outputs that would overwrite an input."""
    from meteora_jax.io import files  # noqa: PLC0415

    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise MissingFileError(f"--prompts {args.prompts} does not exist or is not a file")
    inputs = [
        *model_inputs(args, base, adapters),
        ("--tokenizer", args.tokenizer),
        ("--prompts", args.prompts),
    ]
    for flag in OUTPUTS:
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is not None:
            files.check_output_path(path, inputs=inputs, setting=flag)


def _generation_kwargs(args, model, tokenizer, batch: int) -> dict:
    from meteora_jax.data.prompts import pad_token_of  # noqa: PLC0415
    from meteora_jax.text import stop_ids  # noqa: PLC0415

    kwargs = dict(
        **field_values(args, GenerationSettings, SAMPLING_FLAGS),
        eos_token_id=stop_ids(model, tokenizer),
        pad_token_id=pad_token_of(tokenizer),
        routing_top_k=args.top_k_adapters,
        routing_temperature=args.routing_temperature,
        return_routing=bool(args.routing_html or args.routing_png or args.routing_json),
    )
    if args.force_adapter is not None:
        names = model.adapter_names
        if args.force_adapter not in names:
            raise ConfigError(
                f"--force-adapter {args.force_adapter!r} is not one of the adapters {list(names)}"
            )
        kwargs["adapter_ids"] = [names.index(args.force_adapter)] * batch
    return kwargs


def _write_routing(args, model, traces, records, kwargs) -> None:
    from meteora_jax import viz  # noqa: PLC0415

    k = kwargs["routing_top_k"] or model.moe.top_k
    temperature = kwargs["routing_temperature"] or model.moe.temperature
    subtitle = f"{len(model.adapter_names)} adapters, top-{k}, routing temperature {temperature:g}."
    if args.force_adapter is not None:
        subtitle += f" Forced adapter: {args.force_adapter}."
    if args.routing_html:
        viz.write_routing_html(args.routing_html, traces, subtitle=subtitle)
    if args.routing_png:
        viz.write_routing_heatmap(args.routing_png, traces[0])
    if args.routing_json:
        viz.write_routing_json(args.routing_json, records)
    written = [f for f in (args.routing_html, args.routing_png, args.routing_json) if f]
    print(f"routing written to {', '.join(written)}", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    """The `generate` handler."""
    from tqdm import tqdm  # noqa: PLC0415

    from meteora_jax.api import load_model  # noqa: PLC0415
    from meteora_jax.data.prompts import (  # noqa: PLC0415
        check_prompt_lengths,
        format_prompt,
        load_tokenizer,
        read_as_inputs,
        read_prompts,
    )
    from meteora_jax.io.files import write_text_atomic  # noqa: PLC0415
    from meteora_jax.text import generate_texts, routing_rows  # noqa: PLC0415

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt", from_os=True)
    base, adapters, gates = model_sources(args)
    _check_paths(args, base, adapters)
    model = load_model(base, adapters=adapters, gates=gates, dtype=args.dtype)
    if (args.routing_html or args.routing_png or args.routing_json) and model.moe is None:
        raise ConfigError(
            "--routing-html / --routing-png / --routing-json need adapters (--adapter or --ckpt)"
        )
    tokenizer = load_tokenizer(args.tokenizer or base)
    sources = [("--prompt", args.prompt)] if args.prompt is not None else read_prompts(args.prompts)
    prompts = [prompt for _, prompt in sources]
    source = "--prompt" if args.prompt is not None else args.prompts
    texts = prompts if args.raw else [format_prompt(p) for p in read_as_inputs(prompts, source)]
    check_prompt_lengths(
        tokenizer,
        [(where, text) for (where, _), text in zip(sources, texts, strict=True)],
        model.config.max_position_embeddings,
        args.max_new_tokens,
    )
    traces, records, lines = [], [], []
    started = time.perf_counter()
    if args.prompt is not None:
        kwargs = _generation_kwargs(args, model, tokenizer, 1)
        out, responses = generate_texts(model, tokenizer, texts, stream=True, **kwargs)
        print()
        print(
            f"[{int(out.num_new_tokens[0])} tokens in {time.perf_counter() - started:.1f} s]", file=sys.stderr
        )
        if kwargs["return_routing"]:
            traces, records = routing_rows(out, tokenizer, model, prompts)
    else:
        starts = range(0, len(texts), args.batch_size)
        for start in tqdm(starts, desc="generating", unit="batch", disable=None, file=sys.stderr):
            chunk = slice(start, start + args.batch_size)
            kwargs = _generation_kwargs(args, model, tokenizer, len(texts[chunk]))
            out, responses = generate_texts(model, tokenizer, texts[chunk], **kwargs)
            lines += [
                json.dumps({"prompt": p, "response": r})
                for p, r in zip(prompts[chunk], responses, strict=True)
            ]
            if kwargs["return_routing"]:
                more_traces, more_records = routing_rows(out, tokenizer, model, prompts[chunk])
                traces += more_traces
                records += more_records
        if args.out:
            write_text_atomic(args.out, "".join(line + "\n" for line in lines))
        else:
            print("\n".join(lines))
    if traces:
        _write_routing(args, model, traces, records, kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m meteora_jax.commands.generate ...`: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="meteora-jax")
    add_command(parser.add_subparsers(dest="command", required=True), sys.modules[__name__])
    return run_reporting(parser.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
