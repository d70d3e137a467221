"""The demo's report folder: results.json, report.md (tables and targets), the routing pictures of
a composite answer and the training curves, gathered from the stages' outputs."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections.abc import Mapping, Sequence

from meteora_jax.evaluation.report import self_check_line
from meteora_jax.io.files import staged_directory, write_text_atomic

METRIC = "exact_match_cased"  # every demo task is scored by exact match, case kept
METEORA_ROWS = ("meteora", "meteora-labelled")  # the rows whose gates route (one per gate recipe)
PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_evaluation(run_dir: str) -> dict:
    """The last held-out routing evaluation a training run logged in its metrics.jsonl ({} if none)."""
    found = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "eval" in record:
                found = record["eval"]
    return found


def demo_results(
    rows: Mapping[str, tuple[dict, str]], routing: Mapping[str, dict], seconds: Mapping[str, float]
) -> dict:
    """results.json from `rows` ({row: (an eval's results.json, its mode)}, in table order) and
    `routing` ({row: its gate run's held-out routing evaluation}): per task each row's accuracy;
    per composite size each row's fully-correct rate, per-sub-task accuracy and, for the rows
    that route, the switch accuracy and median lag; the routing figures; the scoring self-check;
    the seconds per stage."""
    tasks_of = {row: results["tasks"][mode] for row, (results, mode) in rows.items()}
    tasks = sorted(next(iter(tasks_of.values())))
    composite: dict[str, dict] = {}
    for row, (results, mode) in rows.items():
        for name, c in results["composite"].get(mode, {}).items():
            entry = composite.setdefault(
                name, {"fully_correct": {}, "subtasks": {}, "switch_accuracy": {}, "switch_lag": {}}
            )
            entry["fully_correct"][row] = c["fully_correct"]
            entry["subtasks"][row] = {t: v[METRIC] for t, v in c["subtasks"].items()}
            if "switch" in c:
                entry["switch_accuracy"][row] = c["switch"]["accuracy"]
                entry["switch_lag"][row] = c["switch"]["median_lag"]
    self_check = {}
    for results, _ in rows.values():
        self_check |= results.get("self_check", {})
    return {
        "tasks": {t: {row: tasks_of[row][t][METRIC] for row in rows} for t in tasks},
        "composite": dict(sorted(composite.items(), key=lambda kv: int(kv[0].split("-")[-1]))),
        "routing": {row: dict(figures) for row, figures in routing.items()},
        "self_check": self_check,
        "seconds": {stage: round(s, 1) for stage, s in seconds.items()},
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _best(values: Mapping[str, float | None]) -> tuple[str, float]:
    """The routed row with the highest value (ties: the first, the paper's recipe)."""
    known = {row: v for row, v in values.items() if row in METEORA_ROWS and v is not None}
    row = max(known, key=lambda r: (known[r], -METEORA_ROWS.index(r))) if known else METEORA_ROWS[0]
    return row, known.get(row, 0.0)


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, each (what, met, the measured figures); a MeteoRA target is met by
    the better of the two gate recipes, named."""
    rows = results["tasks"]
    adapters = [r["adapter"] for r in rows.values()]
    bases = [r["base"] for r in rows.values()]
    weak = [t for t, r in rows.items() if r["adapter"] < 0.9]
    meteora = {row: _mean([r[row] for r in rows.values()]) for row in METEORA_ROWS}
    single_row, single = _best(meteora)
    out = [
        (
            "each task's own adapter >= 90% while the base is near 0%",
            not weak and max(bases) <= 0.05,
            f"adapters {min(adapters):.1%} to {max(adapters):.1%}"
            + (f" (below 90%: {', '.join(weak)})" if weak else "")
            + f", base at most {max(bases):.1%}",
        ),
        (
            "MeteoRA's mean single-task accuracy within 3 points of the adapters'",
            single >= _mean(adapters) - 0.03,
            f"MeteoRA {single:.1%} ({single_row}), adapters {_mean(adapters):.1%}",
        ),
    ]
    for name, floor, times in (("composite-3", 0.6, 3.0), ("composite-5", 0.4, None)):
        if name not in results["composite"]:
            continue
        c = results["composite"][name]["fully_correct"]
        row, value = _best(c)
        want = f"{name}: MeteoRA >= {floor:.0%} of prompts fully correct"
        met = value >= floor
        if times is not None:
            want += f" and >= {times:g}x the averaged adapters"
            met = met and value >= times * c["merged"]
        out.append((want, met, f"MeteoRA {value:.1%} ({row}), averaged adapters {c['merged']:.1%}"))
    accuracy = {
        row: _mean([c["switch_accuracy"][row] for c in results["composite"].values()])
        for row in METEORA_ROWS
        if all(c["switch_accuracy"].get(row) is not None for c in results["composite"].values())
    }
    if accuracy:
        row, value = _best(accuracy)
        lags = [c["switch_lag"][row] for c in results["composite"].values()]
        lag = statistics.median(lags)
        out.append(
            (
                "switching: the sub-task's own adapter dominates >= 85% of answer tokens, median lag <= 1",
                value >= 0.85 and lag <= 1,
                f"{value:.1%} of answer tokens, median lag {lag:g} tokens ({row})",
            )
        )
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _routing_lines(routing: Mapping[str, dict]) -> list[str]:
    """Per recipe: the prompt-level figure and the token accuracy of every layer x projection."""
    lines = []
    for row, figures in routing.items():
        if not figures:
            continue
        per = figures["per_projection"]
        layers = sorted({int(name.split(".")[1]) for name in per})
        projections = [p for p in PROJECTION_ORDER if any(n.endswith(p) for n in per)]
        lines += [
            "",
            f"Gates of `{row}` on {figures['prompts']} held-out single-task prompts: the dominant adapter is "
            f"the prompt's own for {figures['dominant_accuracy']:.1%}; share of tokens (after the "
            f"{figures['shared_prefix_tokens']} every prompt shares) whose top-1 adapter is their task's:",
            "",
        ]
        cells = [[f"layer {i}"] + [_pct(per.get(f"layers.{i}.{p}")) for p in projections] for i in layers]
        lines += _table(["", *projections], cells)
    return lines


def report_markdown(results: dict, cached: Mapping[str, bool]) -> str:
    """report.md: the task table, the composite tables with the switch figures, the routing
    accuracy, the self-check, the targets, the seconds."""
    rows = list(next(iter(results["tasks"].values())))
    lines = ["# meteora-jax demo", "", "Exact match (case kept), greedy decoding, held-out test samples.", ""]
    cells = [[task] + [_pct(row[k]) for k in rows] for task, row in results["tasks"].items()]
    means = {k: _mean([r[k] for r in results["tasks"].values()]) for k in rows}
    cells.append(["**mean**"] + [f"**{_pct(means[k])}**" for k in rows])
    lines += _table(["task", *rows], cells)
    for name, c in results["composite"].items():
        composite_rows = list(c["fully_correct"])
        lines += ["", f"{name} prompts: share fully correct, then per sub-task accuracy:", ""]
        cells = [["fully correct"] + [f"**{_pct(c['fully_correct'][k])}**" for k in composite_rows]]
        tasks = sorted({t for per in c["subtasks"].values() for t in per})
        cells += [[f"sub-task {t}"] + [_pct(c["subtasks"][k].get(t)) for k in composite_rows] for t in tasks]
        cells.append(["switch accuracy"] + [_pct(c["switch_accuracy"].get(k)) for k in composite_rows])
        lag = ["n/a" if c["switch_lag"].get(k) is None else f"{c['switch_lag'][k]:g}" for k in composite_rows]
        cells.append(["median switch lag (tokens)"] + lag)
        lines += _table(["", *composite_rows], cells)
    lines += [
        "",
        "Switch accuracy: the share of answer tokens whose dominant adapter (the most routing weight over "
        "layers and projections) is the sub-answer's own task; switch lag: tokens from a sub-answer's "
        "first token until that adapter dominates. The composite `adapter` column is the oracle routing: "
        "each numbered line written by its own sub-task's adapter alone, a line at a time.",
    ]
    lines += _routing_lines(results["routing"])
    lines += ["", self_check_line(results["self_check"])]
    lines += ["", "## Targets", ""]
    for what, met, figures in targets(results):
        lines.append(f"- {'met' if met else 'MISSED'}: {what}: {figures}")
    lines += ["", "## Seconds per stage", ""]
    stage_cells = [
        [stage, f"{s:.0f}{' (cached)' if cached.get(stage) else ''}"]
        for stage, s in results["seconds"].items()
    ]
    lines += _table(["stage", "seconds"], stage_cells)
    lines += [
        "",
        "Routing of a composite answer (one row per sub-answer, each token coloured by its dominant "
        "adapter): `routing.png` (the paper's recipe), `routing-labelled.png`; token by token with the "
        "prompt: `routing.html`; training curves: `curves/`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out: str,
    rows: Mapping[str, tuple[str, str]],
    *,
    routing: Mapping[str, str],
    pictures: Mapping[str, str],
    curves: Mapping[str, str],
    stages: Mapping[str, dict],
) -> dict:
    """Writes the report folder `out` (replacing an old one) and returns its results.json.

    rows: {row: (an eval output folder, its mode)} in table order; routing: {row: its gate run's
    folder}; pictures: {file name in the report: an eval folder whose routing.png it is, whose
    routing.html comes along for the first}; curves: {name: a curves.png} (copied as
    curves/NAME.png where it exists); stages: {stage: {"seconds", "cached"}} in run order.
    """
    read = {folder: _read(os.path.join(folder, "results.json")) for folder, _ in rows.values()}
    seconds = {name: info["seconds"] for name, info in stages.items()}
    figures = {row: last_evaluation(folder) for row, folder in routing.items()}
    results = demo_results({row: (read[f], mode) for row, (f, mode) in rows.items()}, figures, seconds)
    with staged_directory(out, force=True) as tmp:
        write_text_atomic(os.path.join(tmp, "results.json"), json.dumps(results, indent=2))
        markdown = report_markdown(results, {k: v["cached"] for k, v in stages.items()})
        write_text_atomic(os.path.join(tmp, "report.md"), markdown)
        for i, (name, folder) in enumerate(pictures.items()):
            if os.path.isfile(os.path.join(folder, "routing.png")):
                shutil.copyfile(os.path.join(folder, "routing.png"), os.path.join(tmp, name))
            if i == 0 and os.path.isfile(os.path.join(folder, "routing.html")):
                shutil.copyfile(os.path.join(folder, "routing.html"), os.path.join(tmp, "routing.html"))
        os.makedirs(os.path.join(tmp, "curves"))
        for name, path in curves.items():
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(tmp, "curves", f"{name}.png"))
    return results


def report_path(demo_out: str) -> str:
    """The report.md of a demo folder."""
    return os.path.join(os.path.abspath(demo_out), "report", "report.md")
