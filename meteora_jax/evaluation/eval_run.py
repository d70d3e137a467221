"""`meteora-jax eval` as a function: load, answer in every mode, score, write the four artefacts.

The output folder holds `results.json` (per task, per mode, per metric; composite: per sub-task
plus the share of prompts answered fully right), `report.md` (those tables), `predictions.jsonl`
(prompt, prediction, reference and scores of every answer: for reading failures) and, with
composite prompts and the meteora mode, `routing.html` (the first composite prompt, token by
token) and `routing.png` (its answer, one row of token cells per sub-answer, coloured by the
dominant adapter). It is written under a temporary name and renamed into place, so a failure
leaves nothing.

Before anything is generated, the gold answers are scored (`scoring.self_check`); a task or
composite whose gold answers score below 1.0 is warned about and named in the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence

from meteora_jax import viz
from meteora_jax.api import DEFAULT_DTYPE
from meteora_jax.data.composite import COMPOSITE_LAYOUTS, CompositeSettings
from meteora_jax.errors import ConfigError
from meteora_jax.evaluation.registry import load_registry
from meteora_jax.evaluation.report import report_markdown
from meteora_jax.evaluation.runner import (
    EvalItem,
    EvalSettings,
    answer,
    task_items,
    task_names,
)
from meteora_jax.evaluation.scoring import answer_record, composite_scores, self_check, task_scores
from meteora_jax.evaluation.switching import answer_spans
from meteora_jax.io.files import check_output_path, refuse_existing, staged_directory, write_text_atomic

RESULTS, REPORT, PREDICTIONS = "results.json", "report.md", "predictions.jsonl"
ROUTING_HTML, ROUTING_PNG = "routing.html", "routing.png"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Everything one evaluation needs (the `meteora-jax eval` flags)."""

    base: str
    tasks_dir: str
    out: str
    adapters: Mapping[str, str] | None = None
    gates: str | None = None
    tokenizer: str | None = None
    dtype: str = DEFAULT_DTYPE
    tasks: Sequence[str] | None = None
    composite: str | None = None
    composite_n: int | None = None
    composite_samples: int = 200
    composite_layout: str = CompositeSettings.layout  # how --composite-n prompts are written
    seed: int = 0
    metrics: str | None = None
    settings: EvalSettings = EvalSettings()  # modes, batch size, budget, routing temperatures, limit
    force: bool = False
    progress: bool = True
    inputs: tuple[tuple[str, str], ...] = ()  # (flag, path) the output must not overlap

    def __post_init__(self):
        if self.composite_layout not in COMPOSITE_LAYOUTS:
            raise ConfigError(
                f"--composite-layout must be one of {', '.join(COMPOSITE_LAYOUTS)}, "
                f"got {self.composite_layout!r}"
            )


def composite_items(spec: EvalSpec, names: Sequence[str]) -> list[EvalItem]:
    """The composite prompts of `--composite FILE`, or built from the tasks with `--composite-n`
    (in `--composite-layout`): the first `--limit` of each size, as for each task."""
    from meteora_jax.data.composite import build_composite, read_composite  # noqa: PLC0415

    if spec.composite is not None:
        lines = read_composite(spec.composite)
    elif spec.composite_n is not None:
        lines = build_composite(
            spec.tasks_dir,
            n=spec.composite_n,
            samples=spec.composite_samples,
            seed=spec.seed,
            subtasks=list(names)[: spec.composite_n] if spec.tasks else None,
            layout=spec.composite_layout,
        )
    else:
        return []
    items = [
        EvalItem(
            f"composite-{len(line['subtasks'])}",
            line["prompt"],
            line["response"],
            tuple(line["subtasks"]),
            tuple(line["answers"]),
            where=f"{spec.composite or 'composite'} line {i + 1}",
        )
        for i, line in enumerate(lines)
    ]
    if spec.settings.limit is None:
        return items
    kept, counts = [], {}
    for item in items:
        counts[item.task] = counts.get(item.task, 0) + 1
        if counts[item.task] <= spec.settings.limit:
            kept.append(item)
    return kept


def check_scoring(items: Sequence[EvalItem], registry) -> dict[str, float]:
    """`scoring.self_check` of `items`; warns naming every task or composite scoring below 1.0."""
    scores = self_check(items, registry)
    low = {name: score for name, score in scores.items() if score < 1.0}
    if low:
        named = ", ".join(f"{name} ({score:.3f})" for name, score in low.items())
        warnings.warn(
            f"scoring self-check: gold answers score below 1.0 for {named}: the model cannot score "
            "full marks there (a multi-line reference in a composite prompt? a metric's cleaner?)",
            stacklevel=2,
        )
    return scores


def write_answer_picture(path: str, a, adapter_names: Sequence[str]) -> None:
    """routing.png: the generated answer `a` (composite, with routing), a row per sub-answer."""
    spans = answer_spans(a.routing.pieces, len(a.item.subtasks))
    viz.write_answer_routing_png(
        path,
        a.routing.pieces,
        a.routing.weights_nl,
        spans,
        a.item.subtasks,
        adapter_names,
        title=f"{a.item.task}, {a.item.where}: dominant adapter per generated token",
    )


def evaluate(spec: EvalSpec) -> list[str]:
    """Runs the evaluation `spec` describes; returns the paths written."""
    from tqdm import tqdm  # noqa: PLC0415

    from meteora_jax.api import load_model  # noqa: PLC0415
    from meteora_jax.config import LlamaConfig  # noqa: PLC0415
    from meteora_jax.data.prompts import check_prompt_lengths, format_prompt, load_tokenizer  # noqa: PLC0415

    settings = spec.settings
    check_output_path(spec.out, inputs=spec.inputs)
    refuse_existing(spec.out, force=spec.force)
    registry = load_registry(spec.metrics)
    names = list(spec.tasks) if spec.tasks else task_names(spec.tasks_dir)
    if not names:
        raise ConfigError(f"--tasks {spec.tasks_dir}: no task folder holds a test split (test.jsonl)")
    by_task = task_items(spec.tasks_dir, names, spec.settings.limit)
    composites = composite_items(spec, names)
    for item in composites:
        for task in item.subtasks:
            registry.scoring(task)  # an unknown metric fails now, not after generation
    items = [item for task in by_task.values() for item in task] + composites
    gold = check_scoring(items, registry)
    tokenizer = load_tokenizer(spec.tokenizer or spec.base)
    check_prompt_lengths(
        tokenizer,
        [(item.where, format_prompt(item.prompt)) for item in items],
        LlamaConfig.from_hf(spec.base).max_position_embeddings,
        settings.max_new_tokens,
    )
    model = load_model(spec.base, adapters=spec.adapters, gates=spec.gates, dtype=spec.dtype)
    batches = sum(
        -(-len(group) // settings.batch_size) for group in (list(by_task.values()) + [composites]) if group
    )
    bar = tqdm(total=batches * len(settings.modes), desc="eval", unit="batch", disable=not spec.progress)
    answers, traces = {}, []
    for mode in settings.modes:
        got = []
        for group in [*by_task.values(), composites]:
            if not group:
                continue
            want_routing = mode == "meteora" and group is composites
            more, group_traces = answer(
                model,
                tokenizer,
                group,
                mode,
                settings,
                on_batch=lambda: bar.update(1),
                want_routing=want_routing,
            )
            got += more
            traces = traces or group_traces
        answers[mode] = got
    bar.close()
    adapters = list(model.adapter_names)
    results = {
        "settings": {
            "modes": list(settings.modes),
            "max_new_tokens": settings.max_new_tokens,
            "routing_temperature": settings.routing_temperature,
            "composite_routing_temperature": settings.composite_routing_temperature,
            "composite_layout": spec.composite_layout if spec.composite_n is not None else None,
            "limit": settings.limit,
            "adapters": adapters,
            "prompts": len(items),
        },
        "self_check": gold,
        "tasks": {mode: task_scores(answers[mode], registry) for mode in settings.modes},
        "composite": {
            mode: composite_scores(answers[mode], registry, adapters)
            for mode in settings.modes
            if any(a.item.is_composite for a in answers[mode])
        },
    }
    records = [answer_record(a, registry, adapters) for mode in settings.modes for a in answers[mode]]
    pictured = next((a for a in answers.get("meteora", []) if a.routing is not None), None)
    with staged_directory(spec.out, force=spec.force) as tmp:
        write_text_atomic(os.path.join(tmp, RESULTS), json.dumps(results, indent=2))
        write_text_atomic(os.path.join(tmp, REPORT), report_markdown(results))
        write_text_atomic(os.path.join(tmp, PREDICTIONS), "".join(json.dumps(r) + "\n" for r in records))
        if traces:
            viz.write_routing_html(
                os.path.join(tmp, ROUTING_HTML), traces[:1], subtitle="first composite prompt"
            )
        if pictured is not None:
            write_answer_picture(os.path.join(tmp, ROUTING_PNG), pictured, adapters)
    out = os.path.abspath(spec.out)
    written = [RESULTS, REPORT, PREDICTIONS] + ([ROUTING_HTML] if traces else [])
    written += [ROUTING_PNG] if pictured is not None else []
    print(report_markdown(results), file=sys.stderr)
    return [os.path.join(out, name) for name in written]
