"""Samples longer than `--seq-len`, found before a run starts: refused, or warned about once.

Training cuts a sample longer than `seq_len` slots to its first `seq_len` tokens
(`data.pipeline`): a prompt / response sample loses the end of its response, one whose prompt
alone fills the row trains on no response at all, and a cut composite (segments) sample loses its
answers. So before anything is written, every training sample is encoded once, as training
encodes it (`data.samples.encode_sample`), and a run is refused when a sample would keep no
response token or when more than half of one task's samples would be cut; fewer cuts get one
loud warning. The training loop still counts the cut samples of every step.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from meteora_jax.data.samples import encode_sample
from meteora_jax.data.tasks import Sample
from meteora_jax.errors import ConfigError
from meteora_jax.training.run_log import log


@dataclasses.dataclass(frozen=True)
class FileCuts:
    """What `seq_len` does to the samples of one task file."""

    file: str
    samples: int
    cut: int  # samples longer than seq_len
    no_response: int  # of those, samples left without a response token (the prompt fills the row)
    longest: int  # tokens of the file's longest sample


def _file_of(task: str, samples: Sequence[Sample]) -> str:
    where = samples[0].where if samples else ""
    return where.rsplit(" line ", 1)[0] if where else f"task {task!r}"


def _describe(c: FileCuts) -> str:
    text = f"{c.file}: {c.cut} of {c.samples} samples are longer (the longest has {c.longest} tokens)"
    if c.no_response:
        text += f", {c.no_response} of them keep no response token (the prompt fills the row)"
    return text


def count_cuts(tasks: Mapping[str, Sequence[Sample]], tokenizer, seq_len: int) -> list[FileCuts]:
    """`FileCuts` of every task file of `tasks` (`load_tasks`' result), in its order.

    A sample's response is its tokens that `lm_loss="response"` trains (the response and EOS; all
    the tokens of a segments sample, which has no prompt); the token ids do not depend on lm_loss.
    """
    out = []
    for task, samples in tasks.items():
        cut = no_response = longest = 0
        for sample in samples:
            encoded = encode_sample(tokenizer, sample, lm_loss="response")
            length = len(encoded["input_ids"])
            longest = max(longest, length)
            if length > seq_len:
                cut += 1
                no_response += not np.any(encoded["target_mask"][:seq_len])
        out.append(FileCuts(_file_of(task, samples), len(samples), cut, no_response, longest))
    return out


def check_truncation(
    tasks: Mapping[str, Sequence[Sample]], tokenizer, seq_len: int, *, command: str
) -> list[FileCuts]:
    """Refuses a `seq_len` that would leave a sample without its response or cut more than half
    of a task's samples; warns once (a `UserWarning` and a line on stderr) about fewer cuts.
    Returns the counts.

    Raises:
        ConfigError: naming each file at fault, its counts, its longest sample's tokens and the
            `--seq-len` that fits every sample.
    """
    counts = count_cuts(tasks, tokenizer, seq_len)
    cut = [c for c in counts if c.cut]
    if not cut:
        return counts
    fits = max(c.longest for c in counts)
    bad = [c for c in cut if c.no_response or 2 * c.cut > c.samples]
    if bad:
        problems = "; ".join(_describe(c) for c in bad)
        raise ConfigError(
            f"--seq-len {seq_len} would cut the training samples so that they train little or nothing: "
            f"{problems}; --seq-len {fits} fits every sample"
        )
    listed = ", ".join(f"{c.file} {c.cut} of {c.samples} (longest {c.longest} tokens)" for c in cut)
    message = (
        f"--seq-len {seq_len} cuts {sum(c.cut for c in cut)} training samples, which lose the end of "
        f"their response: {listed}; --seq-len {fits} fits every sample"
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    log(command, f"WARNING: {message}")
    return counts


def heldout_within(samples: Sequence, lengths: Sequence[int], seq_len: int, command: str) -> list:
    """The held-out `samples` (each with a `where`) of at most `seq_len` tokens (`lengths`): the
    evaluation pads a batch to its longest sample, so one huge test prompt would need memory no
    training step does. The others are left out with one warning naming the first of them."""
    kept = [s for s, n in zip(samples, lengths, strict=True) if n <= seq_len]
    long = [(s, n) for s, n in zip(samples, lengths, strict=True) if n > seq_len]
    if long:
        first, n = long[0]
        warnings.warn(
            f"{command}: {len(long)} held-out samples are longer than --seq-len {seq_len} and are left out "
            f"of the held-out evaluation (the first: {first.where}, {n} tokens)",
            UserWarning,
            stacklevel=2,
        )
    return kept
