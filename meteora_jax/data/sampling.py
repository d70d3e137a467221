"""Task sampling: the one unbounded global sequence of samples that every batch row draws from.

Deterministic from the seed and indexable (a grain `MapDataset`), so any host can read any element
without reading the ones before it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from meteora_jax.data.tasks import Sample
from meteora_jax.errors import ConfigError

TASK_SAMPLINGS = ("proportional", "balanced")
DEFAULT_TASK_SAMPLING = "proportional"
_MIX_TURNS = 64  # balanced: shuffle windows of this many turns over all tasks


class BlockShuffleMapDataset(grain.MapDataset):
    """`parent` (indexed without end, like `MapDataset.source`) shuffled in blocks of `block`.

    Block b of the output is a seeded permutation of parent elements [b*block, (b+1)*block), so
    with `block = len(source)` each epoch is reshuffled. Grain's own `shuffle` (an index cipher)
    costs milliseconds per element on datasets of a few hundred samples; a cached numpy
    permutation per block costs O(block) once.
    """

    def __init__(self, parent: grain.MapDataset, *, block: int, seed: tuple[int, ...]):
        super().__init__(parent)
        self._block = block
        self._seed = seed
        self._permutation = functools.lru_cache(maxsize=16)(self._make_permutation)

    def _make_permutation(self, b: int) -> np.ndarray:
        return np.random.default_rng([*self._seed, b]).permutation(self._block)

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"BlockShuffleMapDataset(block={self._block})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        b, i = divmod(index, self._block)
        return self._parent[b * self._block + int(self._permutation(b)[i])]


def sample_sequence(
    tasks: Mapping[str, Sequence[Sample]], *, task_sampling: str = DEFAULT_TASK_SAMPLING, seed: int = 0
) -> grain.MapDataset:
    """The unbounded global sample sequence (element i is one `Sample`), fixed by `seed`.

    "proportional": all samples of all tasks, reshuffled each epoch. "balanced": the tasks in
    equal turns (grain's `MapDataset.mix`), each task reshuffled each of its own epochs, the turns
    shuffled within windows of `_MIX_TURNS` turns.
    """
    if task_sampling not in TASK_SAMPLINGS:
        raise ConfigError(f"task_sampling must be one of {TASK_SAMPLINGS}, got {task_sampling!r}")
    if not tasks or any(not samples for samples in tasks.values()):
        raise ConfigError("tasks must map each task name to a non-empty list of samples")
    if task_sampling == "proportional":
        every = [s for samples in tasks.values() for s in samples]
        return BlockShuffleMapDataset(grain.MapDataset.source(every), block=len(every), seed=(seed, 0))
    per_task = [
        BlockShuffleMapDataset(grain.MapDataset.source(list(samples)), block=len(samples), seed=(seed, 1, t))
        for t, samples in enumerate(tasks.values())
    ]
    turns = grain.MapDataset.mix(per_task)  # equal weights: one sample of each task in turn
    return BlockShuffleMapDataset(turns, block=_MIX_TURNS * len(per_task), seed=(seed, 2))
