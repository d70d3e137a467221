"""results.json -> report.md: the scoring self-check, one table of task metrics by mode, one per
composite prompt set (with how the gates switched adapters where routing was recorded)."""

from __future__ import annotations


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}"


def _rows(by_mode: dict[str, dict], modes: list[str]) -> list[str]:
    """Markdown rows `| name | metric | mode... |` of {mode: {name: {metric: value}}}."""
    names = list(dict.fromkeys(name for mode in modes for name in by_mode.get(mode, {})))
    rows = []
    for name in names:
        metrics = list(dict.fromkeys(k for mode in modes for k in by_mode.get(mode, {}).get(name, {})))
        for metric in (m for m in metrics if m != "samples"):
            cells = [_cell(by_mode.get(mode, {}).get(name, {}).get(metric)) for mode in modes]
            rows.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return rows


def _composite_temperature(s: dict) -> str:
    if s.get("composite_routing_temperature") is not None:
        return f"{s['composite_routing_temperature']:g}"
    if s["routing_temperature"] is not None:
        return "the routing temperature"
    return "the reference's (15 / 20 / 30 for composite-3 / 5 / 10)"


def self_check_line(scores: dict[str, float]) -> str:
    """The report line of `scoring.self_check`'s scores: all 1.0, or a warning naming the rest."""
    low = {name: score for name, score in scores.items() if score < 1.0}
    if not low:
        return "Scoring self-check: gold answers score 1.0 for every task and composite."
    named = ", ".join(f"{name} ({score:.3f})" for name, score in low.items())
    return (
        f"**WARNING: scoring self-check failed: gold answers score below 1.0 for {named}.** Scores "
        "there cannot reach 1.0 whatever the model answers (a multi-line reference in a composite "
        "prompt? a metric's cleaner?)."
    )


def _switch(mode: str, switch: dict) -> list[str]:
    """The switch figures of one composite set in one mode (`switching.summarize_switch`)."""
    if not switch["sub_answers"]:
        lines = ["", f"Adapter switching ({mode}): no sub-answer to judge."]
    else:
        lines = [
            "",
            f"Adapter switching ({mode}): {_cell(switch['accuracy'])} of the tokens of "
            f"{switch['sub_answers']} sub-answers have their sub-task's adapter dominant; switch lag "
            f"(tokens before the first such token) median {switch['median_lag']:g}, mean "
            f"{switch['mean_lag']:.2f}.",
            "",
            "| sub-task | token accuracy | median lag | sub-answers |",
            "|---|---|---|---|",
        ]
        for task, x in switch["subtasks"].items():
            task_lag = "n/a" if x["median_lag"] is None else f"{x['median_lag']:g}"
            lines.append(f"| {task} | {_cell(x['accuracy'])} | {task_lag} | {x['sub_answers']} |")
    if switch["missing_lines"]:
        lines += ["", f"{switch['missing_lines']} sub-answers had no numbered line and are not counted."]
    if switch["no_adapter"]:
        lines += ["", f"Left out (no adapter of that name): {', '.join(switch['no_adapter'])}."]
    return lines


def report_markdown(results: dict) -> str:
    """The report of one evaluation (see `evaluation.eval_run`)."""
    modes = results["settings"]["modes"]
    header = "| task | metric | " + " | ".join(modes) + " |\n|---|---|" + "---|" * len(modes)
    s = results["settings"]
    lines = [
        "# meteora-jax eval",
        "",
        f"Adapters: {', '.join(s['adapters']) or 'none'}; greedy, up to {s['max_new_tokens']} new tokens; "
        f"routing temperature: {s['routing_temperature'] or 'the model default'}; "
        f"composite prompts (meteora mode): {_composite_temperature(s)}; {s['prompts']} prompts"
        + (f" (composite layout: {s['composite_layout']})." if s.get("composite_layout") else "."),
        "",
        *([self_check_line(results["self_check"]), ""] if "self_check" in results else []),
        "## Tasks",
        "",
        header,
        *_rows(results["tasks"], modes),
    ]
    for name in dict.fromkeys(n for mode in results["composite"].values() for n in mode):
        by_mode = {mode: results["composite"][mode].get(name, {}) for mode in results["composite"]}
        subtasks = {mode: r.get("subtasks", {}) for mode, r in by_mode.items()}
        fully = {
            mode: {"all answers right": {"fully_correct": r.get("fully_correct")}}
            for mode, r in by_mode.items()
        }
        samples = next(iter(by_mode.values())).get("samples")
        lines += [
            "",
            f"## {name} ({samples} prompts; modes without a column here do not apply)",
            "",
            "| sub-task | metric | " + " | ".join(by_mode) + " |\n|---|---|" + "---|" * len(by_mode),
            *_rows(subtasks, list(by_mode)),
            *_rows(fully, list(by_mode)),
        ]
        for mode, r in by_mode.items():
            if r.get("switch"):
                lines += _switch(mode, r["switch"])
    return "\n".join(lines) + "\n"
