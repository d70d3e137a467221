"""The demo's report folder: results.json, report.md (tables and targets), the routing view of a
composite prompt and the training curves, gathered from the stages' outputs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence

from meteora_jax.io.files import staged_directory, write_text_atomic

METRIC = "exact_match"  # every demo task is scored by exact match


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def demo_results(
    rows: Mapping[str, tuple[dict, str]], seconds: Mapping[str, float], n: int
) -> tuple[dict, dict[str, dict[str, float]]]:
    """results.json from `rows` ({row: (an eval's results.json, its mode)}, in table order):
    per task each row's accuracy, composite-n the fully-correct rate of each row that answered
    composite prompts, and the seconds per stage; with it, {row: {sub-task: accuracy}} of the
    composite prompts (for the report)."""
    name = f"composite-{n}"
    tasks_of = {row: results["tasks"][mode] for row, (results, mode) in rows.items()}
    composite_of = {
        row: results["composite"][mode][name]
        for row, (results, mode) in rows.items()
        if name in results["composite"].get(mode, {})
    }
    tasks = sorted(next(iter(tasks_of.values())))
    results = {
        "tasks": {t: {row: tasks_of[row][t][METRIC] for row in rows} for t in tasks},
        "composite": {"n": n, **{row: c["fully_correct"] for row, c in composite_of.items()}},
        "seconds": {stage: round(s, 1) for stage, s in seconds.items()},
    }
    subtasks = {row: {t: v[METRIC] for t, v in c["subtasks"].items()} for row, c in composite_of.items()}
    return results, subtasks


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, each (what, met, the measured figures)."""
    rows = results["tasks"]
    adapters = [r["adapter"] for r in rows.values()]
    bases = [r["base"] for r in rows.values()]
    meteora = [r["meteora"] for r in rows.values()]
    c = results["composite"]
    weak = [t for t, r in rows.items() if r["adapter"] < 0.9]
    return [
        (
            "each task's own adapter >= 90% while the base is near 0%",
            not weak and max(bases) <= 0.05,
            f"adapters {min(adapters):.1%} to {max(adapters):.1%}"
            + (f" (below 90%: {', '.join(weak)})" if weak else "")
            + f", base at most {max(bases):.1%}",
        ),
        (
            "MeteoRA's mean single-task accuracy within 5 points of the adapters'",
            _mean(meteora) >= _mean(adapters) - 0.05,
            f"MeteoRA {_mean(meteora):.1%}, adapters {_mean(adapters):.1%}",
        ),
        (
            f"composite-{c['n']}: MeteoRA >= 50% fully correct and >= 2x the averaged adapters",
            c["meteora"] >= 0.5 and c["meteora"] >= 2 * c["merged"],
            f"MeteoRA {c['meteora']:.1%}, averaged adapters {c['merged']:.1%}, base {c['base']:.1%}",
        ),
    ]


def report_markdown(
    results: dict, subtasks: Mapping[str, Mapping[str, float]], cached: Mapping[str, bool]
) -> str:
    """report.md: the task table, the composite table (per sub-task too), the targets, the seconds."""
    rows = list(next(iter(results["tasks"].values())))
    lines = ["# meteora-jax demo", "", "Exact match, greedy decoding, held-out test samples.", ""]
    lines += ["| task | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for task, row in results["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[k]:.1%}" for k in rows) + " |")
    means = {k: _mean([r[k] for r in results["tasks"].values()]) for k in rows}
    lines.append("| **mean** | " + " | ".join(f"**{means[k]:.1%}**" for k in rows) + " |")
    c = results["composite"]
    composite_rows = [k for k in c if k != "n"]
    lines += ["", f"Composite-{c['n']} prompts (every sub-answer right; per sub-task below):", ""]
    lines += ["| | " + " | ".join(composite_rows) + " |", "|---" * (len(composite_rows) + 1) + "|"]
    lines.append("| fully correct | " + " | ".join(f"{c[k]:.1%}" for k in composite_rows) + " |")
    for task in next(iter(subtasks.values()), {}):
        cells = [f"{subtasks[k][task]:.1%}" for k in composite_rows]
        lines.append(f"| sub-task {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for what, met, figures in targets(results):
        lines.append(f"- {'met' if met else 'MISSED'}: {what}: {figures}")
    lines += ["", "## Seconds per stage", "", "| stage | seconds |", "|---|---|"]
    for stage, s in results["seconds"].items():
        lines.append(f"| {stage} | {s:.0f}{' (cached)' if cached.get(stage) else ''} |")
    lines += [
        "",
        "Routing of a composite prompt: `routing.html`, `routing.png`; training curves: `curves/`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out: str,
    rows: Mapping[str, tuple[str, str]],
    *,
    routing: str,
    curves: Mapping[str, str],
    stages: Mapping[str, dict],
    n: int,
) -> dict:
    """Writes the report folder `out` (replacing an old one) and returns its results.json.

    rows: {row: (an eval output folder, its mode)} in table order; routing: the eval folder whose
    routing view is copied; curves: {name: a curves.png} (copied as curves/NAME.png where it
    exists); stages: {stage: {"seconds", "cached"}} in run order; n: the composite size.
    """
    read = {folder: _read(os.path.join(folder, "results.json")) for folder, _ in rows.values()}
    seconds = {name: info["seconds"] for name, info in stages.items()}
    results, subtasks = demo_results({row: (read[f], mode) for row, (f, mode) in rows.items()}, seconds, n)
    with staged_directory(out, force=True) as tmp:
        write_text_atomic(os.path.join(tmp, "results.json"), json.dumps(results, indent=2))
        markdown = report_markdown(results, subtasks, {k: v["cached"] for k, v in stages.items()})
        write_text_atomic(os.path.join(tmp, "report.md"), markdown)
        for name in ("routing.html", "routing.png"):
            shutil.copyfile(os.path.join(routing, name), os.path.join(tmp, name))
        os.makedirs(os.path.join(tmp, "curves"))
        for name, path in curves.items():
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(tmp, "curves", f"{name}.png"))
    return results


def report_path(demo_out: str) -> str:
    """The report.md of a demo folder."""
    return os.path.join(os.path.abspath(demo_out), "report", "report.md")
