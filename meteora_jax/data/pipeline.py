"""Gate-training batches: a Grain pipeline that packs samples into rows and splits hosts.

Dimension letters: B rows (`batch_size` global, B_local = B / P on each of P hosts), S slots
(`seq_len`).

Global row j of every batch has its own stream: elements j, j+B, j+2B, ... of the one global
sample sequence (`sampling.sample_sequence`), packed on its own. So row j of step n depends on
the data and the config only, never on the process count, and host p builds just rows
[p*B/P, (p+1)*B/P). Packing is grain's `FirstFitPackIterDataset` over `packing_bins` rows of a
stream at a time; samples longer than S are cut to S before it and counted (a training run checks
them all before it starts: `training.truncation`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence

import grain
import grain.experimental as grain_exp
import numpy as np

from meteora_jax.data.prompts import pad_token_of
from meteora_jax.data.samples import DEFAULT_LM_LOSS, LM_LOSSES, encode_sample
from meteora_jax.data.sampling import DEFAULT_TASK_SAMPLING, TASK_SAMPLINGS, sample_sequence
from meteora_jax.data.tasks import Sample
from meteora_jax.errors import ConfigError
from meteora_jax.settings import check_choices, setting

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "lm_targets", "lm_weights", "gate_labels")
_STATE_VERSION = 1
_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How training batches are cut from the task samples.

    Attributes:
        seq_len: S, slots per row; longer samples are cut to S (and counted).
        batch_size: B, rows of the GLOBAL batch (all hosts together).
        packing: several samples per row (True) or one, right padded.
        lm_loss: "all" (every token, the reference) or "response" (response tokens only).
        task_sampling: "proportional" (every sample once per epoch) or "balanced" (tasks equally).
        seed: fixes the shuffles (0 <= seed < 2**32).
        packing_bins: rows of one stream filled together by first-fit packing (1: greedy).
    """

    seq_len: int = setting(512, "slots per row; samples it would cut are refused or warned about")
    batch_size: int = setting(8, "rows of the global batch")
    packing: bool = setting(True, "several samples per row (off: one sample per row)")
    lm_loss: str = setting(DEFAULT_LM_LOSS, "LM loss on all tokens or the response only", choices=LM_LOSSES)
    task_sampling: str = setting(
        DEFAULT_TASK_SAMPLING,
        "every sample once per epoch, or the tasks equally often",
        choices=TASK_SAMPLINGS,
    )
    seed: int = setting(0, "the data order")
    packing_bins: int = 4

    def __post_init__(self):
        for name, low in (("seq_len", 2), ("batch_size", 1), ("packing_bins", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"DataConfig.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"DataConfig.packing must be True or False, got {self.packing!r}")
        for problem in check_choices(self):
            raise ConfigError(f"DataConfig.{problem}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"DataConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Counts for this host's rows of one batch (sum them over hosts for the global batch)."""

    num_samples: int  # samples (or pieces of them) in the rows
    num_truncated: int  # of those, samples cut to seq_len
    num_tokens: int  # non-padding slots


def _encode(tokenizer, config: DataConfig, sample: Sample) -> dict:
    encoded = encode_sample(tokenizer, sample, lm_loss=config.lm_loss)
    truncated = len(encoded["input_ids"]) > config.seq_len
    if truncated:
        encoded = {k: v[: config.seq_len] for k, v in encoded.items()}
    return {**encoded, "truncated": int(truncated)}


def _finish_row(packed: dict) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """A packed row (S,) -> the batch keys, plus (samples, truncated) in the row.

    Slot t predicts token t+1 of the same sample: never across two samples, never on padding.
    """
    ids_s, seg_s = packed["input_ids"], packed["input_ids_segment_ids"]
    same_s = (seg_s[1:] == seg_s[:-1]) & (seg_s[1:] > 0)  # (S-1,)
    targets_s = np.zeros_like(ids_s)
    targets_s[:-1] = np.where(same_s, ids_s[1:], 0)
    weights_s = np.zeros(ids_s.shape, np.float32)
    weights_s[:-1] = np.where(same_s, packed["target_mask"][1:], 0)
    row = {
        "input_ids": ids_s,
        "segment_ids": seg_s,
        "positions": packed["input_ids_positions"],
        "lm_targets": targets_s,
        "lm_weights": weights_s,
        "gate_labels": packed["gate_labels"],
    }
    return row, (int(seg_s.max()), int(sum(packed["truncated"])))


def row_stream(encoded: grain.MapDataset, row: int, pad_id: int, config: DataConfig) -> grain.IterDataset:
    """Global row `row`'s stream: its share of the encoded sequence, packed into rows (S,)."""
    mine = encoded.slice(slice(row, None, config.batch_size)).to_iter_dataset(_SYNCHRONOUS)
    s = config.seq_len
    packed = grain_exp.FirstFitPackIterDataset(
        mine,
        length_struct={"input_ids": s, "gate_labels": s, "target_mask": s},
        num_packing_bins=config.packing_bins if config.packing else 1,
        max_sequences_per_bin=None if config.packing else 1,
        shuffle_bins=False,
        meta_features=("truncated",),
        padding_struct={"input_ids": pad_id, "gate_labels": -1, "target_mask": 0},
    )
    return packed.map(_finish_row)


def _stack_rows(rows: tuple) -> tuple[dict[str, np.ndarray], BatchStats]:
    batch = {k: np.stack([r[k] for r, _ in rows]).astype(np.int32) for k in BATCH_KEYS if k != "lm_weights"}
    batch["lm_weights"] = np.stack([r["lm_weights"] for r, _ in rows])
    stats = BatchStats(
        num_samples=sum(n for _, (n, _) in rows),
        num_truncated=sum(t for _, (_, t) in rows),
        num_tokens=int(np.count_nonzero(batch["segment_ids"])),
    )
    return {k: batch[k] for k in BATCH_KEYS}, stats


class DataStateMismatch(ConfigError):
    """A saved data position belongs to other data or data settings: `changes` names them."""

    def __init__(self, changes: dict[str, tuple]):
        self.changes = changes
        said = "; ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in changes.items())
        super().__init__(said)


class TrainBatches(grain.DatasetIterator):
    """This host's rows of every global batch, without end.

    `next()` gives a dict of `BATCH_KEYS`, each (B_local, S): input_ids, segment_ids (0 padding,
    1, 2, ... per packed sample), positions (restarting at 0 per sample), lm_targets (slot t's next
    token, 0 where none) int32; lm_weights float32 (1 where slot t's target counts); gate_labels
    int32 (adapter index, -1 padding). Counts stay out of the arrays: `last_stats` (this batch)
    and `total_truncated` (since step 0, kept across `set_state`).

    `get_state()` is JSON-serialisable; `set_state` on an iterator built with the same data,
    config and process layout resumes exactly. Each host saves and restores its own state.
    """

    def __init__(self, rows: grain.IterDataset, layout: dict):
        super().__init__(rows.__iter__())
        self.layout = layout
        self.steps = 0
        self.total_truncated = 0
        self.last_stats: BatchStats | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        batch, self.last_stats = next(self._parent)
        self.steps += 1
        self.total_truncated += self.last_stats.num_truncated
        return batch

    def get_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "layout": self.layout,
            "steps": self.steps,
            "total_truncated": self.total_truncated,
            "rows": self._parent.get_state(),
        }

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"data iterator state is not a version-{_STATE_VERSION} TrainBatches state")
        if state["layout"] != self.layout:
            saved = state["layout"] if isinstance(state["layout"], dict) else {}
            keys = sorted(set(self.layout) | set(saved))
            raise DataStateMismatch(
                {k: (saved.get(k), self.layout.get(k)) for k in keys if saved.get(k) != self.layout.get(k)}
            )
        self._parent.set_state(state["rows"])
        self.steps = state["steps"]
        self.total_truncated = state["total_truncated"]
        self.last_stats = None


def samples_fingerprint(tasks: Mapping[str, Sequence[Sample]]) -> str:
    """A short hash of every task's samples (text and labels, in order): a saved data position
    is only good for the same data."""
    digest = hashlib.sha256()
    for name, samples in tasks.items():
        digest.update(json.dumps([name, [dataclasses.astuple(s)[:4] for s in samples]]).encode())
    return digest.hexdigest()[:16]


def train_batches(
    tasks: Mapping[str, Sequence[Sample]],
    tokenizer,
    config: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 0,
) -> TrainBatches:
    """The batch iterator of host `process_index` of `process_count` (see `TrainBatches`).

    `tasks` is `load_tasks(...)`'s result. Host p builds global rows [p*B/P, (p+1)*B/P) of each
    batch; together the hosts' rows are the same global batch whatever the process count.
    `prefetch` > 0 builds that many batches ahead in one background thread (same batches, same
    states; tokenising is most of the cost), with its own copy of the tokenizer, since a HF fast
    tokenizer must not be called from two threads at once. Call `close()` to stop the thread.

    Raises:
        ConfigError: batch_size not divisible by the process count, or a bad process index.
    """
    if not isinstance(process_count, int) or process_count < 1:
        raise ConfigError(f"process_count must be an integer >= 1, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ConfigError(f"prefetch must be an integer >= 0, got {prefetch!r}")
    if config.batch_size % process_count:
        raise ConfigError(
            f"batch_size {config.batch_size} (global rows) is not divisible by the process count "
            f"{process_count}"
        )
    if prefetch:
        tokenizer = copy.deepcopy(tokenizer)
    sequence = sample_sequence(tasks, task_sampling=config.task_sampling, seed=config.seed)
    encoded = sequence.map(functools.partial(_encode, tokenizer, config))
    local = config.batch_size // process_count
    pad_id = pad_token_of(tokenizer)
    streams = [
        row_stream(encoded, row, pad_id, config)
        for row in range(process_index * local, (process_index + 1) * local)
    ]
    layout = {
        **dataclasses.asdict(config),
        "process_index": process_index,
        "process_count": process_count,
        "tasks": {name: len(samples) for name, samples in tasks.items()},
        "samples": samples_fingerprint(tasks),
    }
    batches = grain_exp.ZipIterDataset(streams).map(_stack_rows)
    if prefetch:
        batches = grain_exp.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return TrainBatches(batches, layout)
