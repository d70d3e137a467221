"""Held-out routing accuracy: do the gates pick each prompt's own task?

For every held-out prompt, the tokens after the prefix that every prompt shares (the chat
template's `[INST]`, a BOS) are scored, since before them nothing tells the tasks apart:
- dominant: the adapter with the most top-1 votes over all those tokens, layers and
  projections is the prompt's task (the prompt-level figure);
- last layer: the share of (token, projection) top-1 choices of the last layer that are the task;
- per projection: that share for every "layers.{i}.{projection}".
Layer 0's q/k/v gates see one token's embedding only, so they cannot know the task from context:
expect them near chance on tokens that every task uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from meteora_jax.data.prompts import left_pad
from meteora_jax.data.samples import HeldOutSample
from meteora_jax.io.checksums import host_array
from meteora_jax.sharding import host_to_global
from meteora_jax.training.step import batch_sharding


def shared_prefix_length(samples: Sequence[HeldOutSample]) -> int:
    """Length of the longest token prefix common to all samples' `input_ids`."""
    rows = [s.input_ids for s in samples]
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


def routing_accuracy(
    top1_of: Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]],
    heldout: Mapping[str, Sequence[HeldOutSample]],
    num_layers: int,
    *,
    num_adapters: int,
    pad_id: int,
    batch_size: int,
) -> dict:
    """The routing figures above over all held-out samples.

    top1_of(ids (B, W), mask (B, W)) -> {"layers.{i}.{projection}": top-1 adapter ids (B, W)}.
    Every batch is padded to the longest sample, so the forward pass compiles once.
    """
    samples = [s for task in heldout.values() for s in task]
    if not samples:
        return {}
    skip = shared_prefix_length(samples)
    width = max(len(s.input_ids) for s in samples)
    hits: dict[str, list[int]] = {}
    dominant_hits, last_hits, last_total = 0, 0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        rows = [s.input_ids for s in chunk]
        rows += [rows[0]] * (batch_size - len(rows))  # a full batch: one compiled shape
        ids, mask = left_pad(rows, pad_id, width)
        top1 = {name: np.asarray(v) for name, v in top1_of(ids, mask).items()}
        for b, sample in enumerate(chunk):
            n = len(sample.input_ids)
            scored = slice(width - n + min(skip, n - 1), width)  # at least the last token
            labels = sample.gate_labels[min(skip, n - 1) :]
            votes = np.zeros(num_adapters, np.int64)
            for name, ids_bw in top1.items():
                chosen = ids_bw[b, scored]
                counts = hits.setdefault(name, [0, 0])
                counts[0] += int(np.sum(chosen == labels))
                counts[1] += len(labels)
                votes += np.bincount(chosen, minlength=num_adapters)
                if name.startswith(f"layers.{num_layers - 1}."):
                    last_hits += int(np.sum(chosen == labels))
                    last_total += len(labels)
            task_label = int(np.bincount(labels, minlength=num_adapters).argmax())
            dominant_hits += int(votes.argmax() == task_label)
    return {
        "prompts": len(samples),
        "shared_prefix_tokens": skip,
        "dominant_accuracy": dominant_hits / len(samples),
        "last_layer_accuracy": last_hits / max(last_total, 1),
        "per_projection": {name: h / max(t, 1) for name, (h, t) in sorted(hits.items(), key=_layer_order)},
    }


def _layer_order(item) -> tuple[int, str]:
    _, layer, projection = item[0].split(".")
    return int(layer), projection


@dataclasses.dataclass(frozen=True)
class RoutingEvaluation:
    """`routing_accuracy` of a model on held-out samples: train-gate's evaluation. `batch_size`
    rows (train-gate: a training micro-batch's) are split over the mesh as a training batch is,
    so a batch needs no more memory per device than a training step's forward pass."""

    heldout: Mapping[str, Sequence[HeldOutSample]]
    pad_id: int
    batch_size: int

    def __call__(self, model, mesh: Mesh) -> dict:
        def top1_of(ids, mask):
            rows = batch_sharding(mesh, ids.shape)  # as a training batch: rows over data x fsdp
            ids, mask = host_to_global(ids, rows), host_to_global(mask, rows)
            out = model(ids, mask, return_routing=True)
            return {name: host_array(r.ids[..., 0]) for name, r in out.routing.items()}

        return routing_accuracy(
            top1_of,
            self.heldout,
            model.config.num_hidden_layers,
            num_adapters=model.moe.num_adapters,
            pad_id=self.pad_id,
            batch_size=self.batch_size,
        )

    def summary(self, result: dict) -> str:
        return (
            f"held-out routing: dominant adapter right for {result['dominant_accuracy']:.1%} of "
            f"{result['prompts']} prompts, last layer {result['last_layer_accuracy']:.1%} of tokens"
        )
