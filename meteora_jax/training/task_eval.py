"""Held-out task quality of a model: response NLL and greedy exact match, from one forward pass.

Dimensions: B rows, W slots (every batch left-padded to the longest sample), V vocab.

Every test sample is encoded as training encodes it (`encode_example`: the formatted prompt,
the response, EOS) and scored on the response tokens and EOS:
- `response_nll`: their mean cross-entropy given everything before them (token-weighted over
  the split): what `--lm-loss response` trains;
- `exact_match`: the share of samples whose every response token and EOS is the argmax given
  the reference tokens before it. That is exactly when greedy decoding returns the reference
  and stops (each greedy step then reproduces the next reference token), so no generation
  loop is needed;
- `token_accuracy`: the share of response tokens (and EOS) that are the argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meteora_jax.data.prompts import encode_example, left_pad
from meteora_jax.data.tasks import Sample
from meteora_jax.io.checksums import host_array
from meteora_jax.sharding import host_to_global
from meteora_jax.training.losses import lm_sums
from meteora_jax.training.step import batch_sharding


@dataclasses.dataclass(frozen=True)
class ScoredSample:
    """One encoded test sample: `ids` (T,) prompt + response + EOS, of which `num_prompt` are
    the prompt; `where` is "FILE line N"."""

    ids: np.ndarray
    num_prompt: int
    where: str


def scored_samples(tokenizer, samples: Sequence[Sample]) -> list[ScoredSample]:
    """The prompt / response samples of a split, encoded (segments samples have no response to
    score and are left out)."""
    out = []
    for s in samples:
        if s.segments is None:
            ids, num_prompt = encode_example(tokenizer, s.prompt, s.response)
            if len(ids) > num_prompt:
                out.append(ScoredSample(np.asarray(ids, np.int32), num_prompt, s.where))
    return out


@jax.jit
def _batch_scores(logits_bwv, targets_bw, weights_bw):
    """(CE sum, scored tokens, argmax hits, per-row all-correct (B,) bool) of one batch."""
    ce, count = lm_sums(logits_bwv, targets_bw, weights_bw)
    hit_bw = jnp.argmax(logits_bwv, axis=-1) == targets_bw
    scored_bw = weights_bw > 0
    hits = jnp.sum(hit_bw & scored_bw, dtype=jnp.float32)
    row_ok_b = jnp.all(hit_bw | ~scored_bw, axis=1)
    return ce, count, hits, row_ok_b


def _batch_arrays(chunk: Sequence[ScoredSample], batch_size: int, width: int, pad_id: int):
    """ids, mask, targets, weights (B, W) of a chunk left-padded to `width`; filler rows (to a
    full batch: one compiled shape) score nothing."""
    rows = [s.ids for s in chunk] + [chunk[0].ids] * (batch_size - len(chunk))
    ids_bw, mask_bw = left_pad(rows, pad_id, width)
    targets_bw = np.concatenate([ids_bw[:, 1:], np.full((batch_size, 1), pad_id, np.int32)], axis=1)
    weights_bw = np.zeros((batch_size, width), np.float32)
    for b, s in enumerate(chunk):
        n = len(s.ids)
        # slot width - n + t holds token t; it predicts token t + 1, scored for t + 1 >= num_prompt
        weights_bw[b, width - n + s.num_prompt - 1 : width - 1] = 1.0
    return ids_bw, mask_bw, targets_bw, weights_bw


def score(model, samples: Sequence[ScoredSample], mesh: Mesh, *, pad_id: int, batch_size: int) -> dict:
    """The figures of the module docstring for `model` (a `MeteoRAModel`) on `samples`."""
    if not samples:
        return {}
    width = max(len(s.ids) for s in samples)
    rows = batch_sharding(mesh, (batch_size, width))  # as a training batch: rows over data x fsdp
    ce = count = hits = 0.0
    exact = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ids, mask, targets, weights = (
            host_to_global(a, rows) for a in _batch_arrays(chunk, batch_size, width, pad_id)
        )
        logits = model(ids, mask).logits
        c, n, h, row_ok = _batch_scores(logits, targets, weights)
        ce, count, hits = ce + float(host_array(c)), count + float(host_array(n)), hits + float(host_array(h))
        exact += int(np.sum(host_array(row_ok)[: len(chunk)]))
    return {
        "samples": len(samples),
        "response_nll": ce / count,
        "exact_match": exact / len(samples),
        "token_accuracy": hits / count,
    }


@dataclasses.dataclass(frozen=True)
class TaskEvaluation:
    """`score` on a held-out split: train-lora's evaluation. `batch_size` rows (train-lora: a
    training micro-batch's) are split over the mesh as a training batch is, so a batch needs no
    more memory per device than a training step's forward pass."""

    samples: Sequence[ScoredSample]
    pad_id: int
    batch_size: int

    def __call__(self, model, mesh: Mesh) -> dict:
        return score(model, self.samples, mesh, pad_id=self.pad_id, batch_size=self.batch_size)

    def summary(self, result: dict) -> str:
        return (
            f"held-out response NLL {result['response_nll']:.4f}, exact match {result['exact_match']:.1%} of "
            f"{result['samples']} samples, token accuracy {result['token_accuracy']:.1%}"
        )
