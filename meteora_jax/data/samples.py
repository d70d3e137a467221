"""Samples to tokens: ids with a gate label and an LM-target flag per token; held-out prompts.

Tokenisation follows `prompts.encode_example` / `encode_segments`, the rules generation shares.
T is the number of tokens of one sample.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from meteora_jax.data.prompts import PROMPT_TEMPLATE, encode_example, encode_segments
from meteora_jax.data.tasks import Sample, load_tasks
from meteora_jax.errors import ConfigError

LM_LOSSES = ("all", "response")
DEFAULT_LM_LOSS = "all"


TEMPLATE_CLOSE = PROMPT_TEMPLATE.split("{input}")[1]  # " [/INST]\n": where a response begins


def encode_sample(tokenizer, sample: Sample, *, lm_loss: str = DEFAULT_LM_LOSS) -> dict[str, np.ndarray]:
    """One sample as `{"input_ids", "gate_labels", "target_mask"}`, each (T,) int32.

    `gate_labels` is the adapter index of every token (a segments sample: its segment's).
    `target_mask[t]` is 1 where token t counts as an LM target: every token for `lm_loss="all"`
    (the reference), the response tokens and EOS for `"response"`. A segments sample's response is
    what follows its last segment ending the chat template (`" [/INST]\n"`, as `labelled_segments`
    writes it); without one, all its tokens count.
    """
    if lm_loss not in LM_LOSSES:
        raise ConfigError(f"lm_loss must be one of {LM_LOSSES}, got {lm_loss!r}")
    if sample.segments is None:
        ids, num_prompt = encode_example(tokenizer, sample.prompt, sample.response)
        labels_t = np.full(len(ids), sample.label, np.int32)
        target_t = np.ones(len(ids), np.int32)
        if lm_loss == "response":
            target_t[:num_prompt] = 0
    else:
        texts = [text for _, text in sample.segments]
        ids, lengths = encode_segments(tokenizer, texts)
        labels_t = np.repeat(np.asarray([label for label, _ in sample.segments], np.int32), lengths)
        target_t = np.ones(len(ids), np.int32)
        closing = [i for i, text in enumerate(texts) if text.endswith(TEMPLATE_CLOSE)]
        if lm_loss == "response" and closing:
            target_t[: sum(lengths[: closing[-1] + 1])] = 0
    return {"input_ids": np.asarray(ids, np.int32), "gate_labels": labels_t, "target_mask": target_t}


@dataclasses.dataclass(frozen=True)
class HeldOutSample:
    """A test sample for routing evaluation: `input_ids` and `gate_labels` (T,) int32.

    `input_ids` is the prompt exactly as generation encodes it (with `with_response`, the whole
    training encoding); a segments sample is always encoded whole. `response` is the reference
    answer text (None for a segments sample); `where` is "FILE line N".
    """

    task: str
    input_ids: np.ndarray
    gate_labels: np.ndarray
    response: str | None
    where: str


def heldout_sample(tokenizer, task: str, sample: Sample, *, with_response: bool = False) -> HeldOutSample:
    """`sample` encoded for evaluation (see `HeldOutSample`)."""
    if sample.segments is None and not with_response:
        ids, _ = encode_example(tokenizer, sample.prompt)
        encoded = {
            "input_ids": np.asarray(ids, np.int32),
            "gate_labels": np.full(len(ids), sample.label, np.int32),
        }
    else:
        encoded = encode_sample(tokenizer, sample)
    return HeldOutSample(task, encoded["input_ids"], encoded["gate_labels"], sample.response, sample.where)


def load_heldout(
    data_dir: str | os.PathLike,
    adapter_names: Sequence[str],
    tokenizer,
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    with_response: bool = False,
) -> dict[str, list[HeldOutSample]]:
    """The `split` samples of every task (`load_tasks` rules), encoded for routing evaluation."""
    loaded = load_tasks(data_dir, adapter_names, tasks=tasks, split=split)
    return {
        task: [heldout_sample(tokenizer, task, s, with_response=with_response) for s in samples]
        for task, samples in loaded.items()
    }
