"""The demo's report folder: results.json, report.md (tables and targets), the routing view of a
composite prompt and the training curves, gathered from the stages' outputs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence

from meteora_jax.io.files import staged_directory, write_text_atomic

ROWS = ("base", "adapter", "meteora", "merged")
COMPOSITE_ROWS = ("meteora", "merged", "base")
METRIC = "exact_match"  # every demo task is scored by exact match


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def demo_results(peft: dict, meteora: dict, seconds: Mapping[str, float], n: int) -> dict:
    """results.json: per task the four accuracies, the composite-n fully-correct rates, seconds."""
    by_mode = {**peft["tasks"], **meteora["tasks"]}
    tasks = sorted(by_mode["base"])
    composite_of = {**peft["composite"], **meteora["composite"]}
    name = f"composite-{n}"
    return {
        "tasks": {t: {row: by_mode[row][t][METRIC] for row in ROWS} for t in tasks},
        "composite": {"n": n, **{row: composite_of[row][name]["fully_correct"] for row in COMPOSITE_ROWS}},
        "composite_subtasks": {
            row: {t: v[METRIC] for t, v in composite_of[row][name]["subtasks"].items()}
            for row in COMPOSITE_ROWS
        },
        "seconds": {stage: round(s, 1) for stage, s in seconds.items()},
    }


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


def report_markdown(results: dict, cached: Mapping[str, bool]) -> str:
    lines = ["# meteora-jax demo", "", "Exact match, greedy decoding, held-out test samples.", ""]
    lines += ["| task | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    for task, row in results["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[k]:.1%}" for k in ROWS) + " |")
    means = {k: _mean([r[k] for r in results["tasks"].values()]) for k in ROWS}
    lines.append("| **mean** | " + " | ".join(f"**{means[k]:.1%}**" for k in ROWS) + " |")
    c = results["composite"]
    lines += ["", f"Composite-{c['n']} prompts (every sub-answer right):", ""]
    lines += ["| | " + " | ".join(COMPOSITE_ROWS) + " |", "|---" * (len(COMPOSITE_ROWS) + 1) + "|"]
    lines.append("| fully correct | " + " | ".join(f"{c[k]:.1%}" for k in COMPOSITE_ROWS) + " |")
    for task in results["composite_subtasks"]["meteora"]:
        cells = [f"{results['composite_subtasks'][k][task]:.1%}" for k in COMPOSITE_ROWS]
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
    out: str, peft_dir: str, meteora_dir: str, curves: Mapping[str, str], stages: Mapping[str, dict], n: int
) -> dict:
    """Writes the report folder `out` (replacing an old one) and returns its results."""
    seconds = {name: info["seconds"] for name, info in stages.items()}
    results = demo_results(
        _read(os.path.join(peft_dir, "results.json")),
        _read(os.path.join(meteora_dir, "results.json")),
        seconds,
        n,
    )
    with staged_directory(out, force=True) as tmp:
        write_text_atomic(os.path.join(tmp, "results.json"), json.dumps(results, indent=2))
        write_text_atomic(
            os.path.join(tmp, "report.md"),
            report_markdown(results, {k: v["cached"] for k, v in stages.items()}),
        )
        for name in ("routing.html", "routing.png"):
            shutil.copyfile(os.path.join(meteora_dir, name), os.path.join(tmp, name))
        os.makedirs(os.path.join(tmp, "curves"))
        for name, path in curves.items():
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(tmp, "curves", f"{name}.png"))
    return results


def report_path(demo_out: str) -> str:
    """The report.md of a demo folder."""
    return os.path.join(os.path.abspath(demo_out), "report", "report.md")
