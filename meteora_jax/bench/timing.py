"""The one timing harness of every benchmark: warm-up, interleaved repeats, settle pause, medians.

Each repeat times every variant of a comparison once, in turn (interleaved), so drift of the
machine (clock boost, other processes) hits all variants alike, and figures are medians over
the repeats. Each timed call waits for its result (`jax.block_until_ready`), so asynchronous
dispatch is never mistaken for speed; warm-up calls (compilation) are not timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping

import jax

# Untimed pause after each timed call, for comparisons that include torch: its OpenMP workers
# spin for a while after a call and would otherwise slow whichever variant runs next
# (measured: the base layer ran ~8% slow after torch).
SETTLE_SECONDS = 0.3
REPEATS = 5  # timed repeats a figure takes the median of, unless told
REFERENCE_MIXTURE = (28, 8)  # adapters x rank of the MeteoRA reference's published models
BENCH_DTYPE = "bfloat16"  # what the accelerator kernels are measured in


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of fn, waiting for its (jax) result."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(
    runs: Mapping[Hashable, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    settle_s: float = 0.0,
) -> dict[Hashable, list[float]]:
    """Seconds of every run in every repeat: {name: [seconds per repeat]}.

    Every run is first called `warmup` times (untimed); then each of `repeats` rounds calls every
    run once, in the mapping's order, each call followed by an untimed `settle_s` pause.
    """
    for _ in range(warmup):
        for run in runs.values():
            jax.block_until_ready(run())
    samples: dict[Hashable, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(timed(run))
            if settle_s:
                time.sleep(settle_s)
    return samples


def medians(samples: Mapping[Hashable, list[float]]) -> dict[Hashable, float]:
    """{name: median} of `interleaved`'s samples."""
    return {name: statistics.median(values) for name, values in samples.items()}
