"""Text in, text out: formatted prompt texts through the tokenizer and jitted generation, the
responses decoded, and the routing of a generation as the viewer's traces.

One place for what `meteora-jax generate` and `meteora-jax eval` both do with text, so the two
cannot decode, stop or show routing differently.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from meteora_jax import viz
from meteora_jax.data.prompts import IncrementalDecoder, encode_prompts, pad_token_of, token_texts
from meteora_jax.generation import GenerateOutput, generate


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the model config's EOS ids and the tokenizer's."""
    eos = {int(e) for e in model.config.eos_token_id}
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return sorted(eos)


def generate_texts(
    model, tokenizer, texts: Sequence[str], *, stream: bool = False, **generate_kwargs
) -> tuple[GenerateOutput, list[str]]:
    """(the generation, the decoded responses) of one batch of already formatted prompt `texts`.

    Prompts are encoded and left-padded as `encode_prompts` does; each response is decoded from
    its real new tokens without special tokens (EOS dropped). stream: print row 0's tokens to
    stdout as they are decoded. Defaults for `eos_token_id` / `pad_token_id`: `stop_ids` and the
    tokenizer's pad id; the other keyword arguments go to `generation.generate`.
    """
    batch = encode_prompts(tokenizer, list(texts))
    generate_kwargs.setdefault("eos_token_id", stop_ids(model, tokenizer))
    generate_kwargs.setdefault("pad_token_id", pad_token_of(tokenizer))
    on_token = None
    if stream:
        decoder = IncrementalDecoder(tokenizer)

        def on_token(tokens_b, live_b):
            if live_b[0]:
                sys.stdout.write(decoder.push(int(tokens_b[0])))
                sys.stdout.flush()

    out = generate(
        model, batch.input_ids, attention_mask=batch.attention_mask, on_token=on_token, **generate_kwargs
    )
    new_bn = np.asarray(out.new_tokens)
    live_bn = np.asarray(out.attention_mask[:, out.prompt_length :]).astype(bool)
    responses = [tokenizer.decode(new_bn[b][live_bn[b]], skip_special_tokens=True) for b in range(len(texts))]
    return out, responses


def routing_rows(out: GenerateOutput, tokenizer, model, prompts: Sequence[str]) -> tuple[list, list[dict]]:
    """(viewer trace, JSON record) per row of a generation run with `return_routing=True`;
    `prompts` titles the rows."""
    seq_bt, mask_bt = np.asarray(out.sequences), np.asarray(out.attention_mask).astype(bool)
    texts = [token_texts(tokenizer, seq_bt[b][mask_bt[b]]) for b in range(seq_bt.shape[0])]
    titles = [p if len(p) <= 80 else p[:77] + "..." for p in prompts]
    traces = viz.traces_from_generation(out, texts, model.adapter_names, titles)
    records = [
        {"prompt": prompts[b], **viz.routing_record(out, b, texts[b], model.adapter_names)}
        for b in range(seq_bt.shape[0])
    ]
    return traces, records
