"""Text in, text out: formatted prompt texts through the tokenizer and jitted generation, the
responses decoded, and the routing of a generation as the viewer's traces.

One place for what `meteora-jax generate` and `meteora-jax eval` both do with text, so the two
cannot decode, stop or show routing differently.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from meteora_jax import viz
from meteora_jax.data.prompts import IncrementalDecoder, encode_prompts, pad_token_of, token_texts
from meteora_jax.generation import GenerateOutput, generate
from meteora_jax.ops.routing import Routing


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


@dataclasses.dataclass(frozen=True)
class GeneratedRouting:
    """How one row's generated tokens were routed: each token's display piece (N of them,
    concatenating to the response with special tokens shown) and its mean weight per adapter
    (`viz.adapter_weights`), (N, L)."""

    pieces: tuple[str, ...]
    weights_nl: np.ndarray


def generated_routing(out: GenerateOutput, tokenizer, model) -> list[GeneratedRouting]:
    """The routing of every row's real new tokens, a final stop token (EOS) left out, of a
    generation run with `return_routing=True`. Only the new positions leave the device."""
    p = out.prompt_length
    new = {key: Routing(ids=r.ids[:, p:], weights=r.weights[:, p:]) for key, r in out.routing.items()}
    weights_bnl = viz.adapter_weights(new, len(model.adapter_names))
    seq_bt, mask_bt = np.asarray(out.sequences), np.asarray(out.attention_mask).astype(bool)
    stops = set(stop_ids(model, tokenizer))
    rows = []
    for b in range(seq_bt.shape[0]):
        # decoded in the prompt's context, so a first token keeps the space it shows in the full text
        pieces = token_texts(tokenizer, seq_bt[b][mask_bt[b]])[int(mask_bt[b, :p].sum()) :]
        real_n = mask_bt[b, p:]
        weights_nl = weights_bnl[b][real_n]
        if real_n.any() and int(seq_bt[b, p:][real_n][-1]) in stops:
            pieces, weights_nl = pieces[:-1], weights_nl[:-1]
        rows.append(GeneratedRouting(tuple(pieces), weights_nl))
    return rows
