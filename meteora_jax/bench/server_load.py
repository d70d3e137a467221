"""Serving benchmark: tokens/s and time to first token of the serving engine under concurrent
clients, the fused model against its base, in one run.

Each client submits a request (`prompt_length` random tokens, `new_tokens` greedy tokens, no
EOS), waits for its last token, then submits the next, `requests_per_client` times. The engine
(`meteora_jax.serving.engine`, `max(clients)` slots, every program compiled first) is driven
directly, without HTTP, so the figures are the batching's, not the web stack's. Runs are
interleaved repeat by repeat over (model, clients) by the common timing harness; throughput is
tokens / wall time of a run, time to first token the median over a run's requests, each figure
the median over repeats.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import jax
import numpy as np

from meteora_jax.bench.decoding import GenerateBenchSettings, bench_models
from meteora_jax.bench.tables import base_and_meteora_rows, markdown_table, mixture_title
from meteora_jax.bench.timing import REPEATS, interleaved
from meteora_jax.errors import ConfigError
from meteora_jax.serving.engine import Engine, Request, RowSettings


@dataclasses.dataclass(frozen=True)
class ServeBenchSettings:
    """Concurrency levels and the requests each client sends (the model: `GenerateBenchSettings`)."""

    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 2
    prompt_length: int = 32
    new_tokens: int = GenerateBenchSettings.new_tokens
    repeats: int = REPEATS
    seed: int = 0

    def __post_init__(self):
        if not self.clients or min(self.clients) < 1:
            raise ConfigError(f"clients must be positive, got {self.clients}")
        if self.repeats < REPEATS:
            raise ConfigError(f"repeats must be >= {REPEATS} (the figures are medians), got {self.repeats}")
        for name in ("requests_per_client", "prompt_length", "new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def _client_run(engine: Engine, s: ServeBenchSettings, clients: int, first_token_s: list[list[float]]):
    """A zero-argument run: `clients` threads, each sending its requests one after another;
    appends the run's times to first token to `first_token_s`."""
    prompts = np.random.default_rng(s.seed).integers(
        3, engine.model.config.vocab_size, (clients, s.prompt_length)
    )

    def run():
        waits: list[float] = []

        def client(i: int):
            for _ in range(s.requests_per_client):
                done, first = threading.Event(), []
                submitted = time.perf_counter()

                def emit(token, mix, first=first):
                    if not first:
                        first.append(time.perf_counter())
                    return True

                job = Request(
                    prompts[i].tolist(), s.new_tokens, RowSettings(), (), emit, lambda r, d=done: d.set()
                )
                engine.submit(job)
                done.wait()
                waits.append(first[0] - submitted)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first_token_s.append(waits)

    return run


def bench_serve(model_settings: GenerateBenchSettings, s: ServeBenchSettings) -> dict:
    """{"settings", "device", "results": [{"clients", "base": {...}, "meteora": {...},
    "throughput_ratio"}]}: per model and concurrency, tokens/s and the median time to first
    token; `scaling` is each model's tokens/s at the most clients over one client's."""
    models = bench_models(model_settings)
    slots = max(s.clients)
    engines = {}
    for name, model in models.items():
        engine = Engine(model, slots=slots, max_length=s.prompt_length + s.new_tokens, max_queue=slots * 4)
        engine.warm_up()
        engine.start()
        engines[name] = engine
    waits = {(name, c): [] for name in engines for c in s.clients}
    runs = {
        (name, c): _client_run(engines[name], s, c, waits[(name, c)]) for name in engines for c in s.clients
    }
    try:
        samples = interleaved(runs, s.repeats)
    finally:
        for engine in engines.values():
            engine.stop(timeout=60)
    results = []
    for c in s.clients:
        row = {"clients": c}
        tokens = c * s.requests_per_client * s.new_tokens
        for name in engines:
            ttft = [statistics.median(run) for run in waits[(name, c)][-s.repeats :]]  # the timed runs
            row[name] = {"tokens_per_s": tokens / statistics.median(samples[(name, c)]),
                         "first_token_s": statistics.median(ttft)}  # fmt: skip
        row["throughput_ratio"] = row["meteora"]["tokens_per_s"] / row["base"]["tokens_per_s"]
        results.append(row)
    first, last = results[0], results[-1]
    scaling = {name: last[name]["tokens_per_s"] / first[name]["tokens_per_s"] for name in engines}
    ttft_growth = {name: last[name]["first_token_s"] / first[name]["first_token_s"] for name in engines}
    return {
        "settings": {"model": dataclasses.asdict(model_settings), "serve": dataclasses.asdict(s)},
        "device": str(jax.devices()[0]),
        "results": results,
        "scaling": scaling,
        "first_token_growth": ttft_growth,
    }


def format_serve(report: dict) -> str:
    """A markdown table of a `bench_serve` report."""
    m, s = report["settings"]["model"], report["settings"]["serve"]
    load = f"{s['requests_per_client']} requests per client, prompt {s['prompt_length']}"
    load += f", {s['new_tokens']} new tokens"
    title = (
        f"{mixture_title(m)}; {load}, {max(s['clients'])} slots, median of {s['repeats']}; {report['device']}"
    )
    header = "clients | base tok/s | MeteoRA tok/s | ratio | base first token ms | MeteoRA first token ms"
    rows = base_and_meteora_rows(
        report["results"], "clients", "tokens_per_s", "throughput_ratio", "first_token_s"
    )
    lines = [title, "", *markdown_table(header, rows)]
    scale = ", ".join(f"{k} {v:.1f}x" for k, v in report["scaling"].items())
    growth = ", ".join(f"{k} {v:.1f}x" for k, v in report["first_token_growth"].items())
    lines += ["", f"throughput at {max(s['clients'])} clients over 1: {scale}; time to first token: {growth}"]
    return "\n".join(lines)
