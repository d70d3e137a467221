"""results.json -> report.md: one table of task metrics by mode, one per composite prompt set."""

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


def report_markdown(results: dict) -> str:
    """The report of one evaluation (see `evaluation.evaluate`)."""
    modes = results["settings"]["modes"]
    header = "| task | metric | " + " | ".join(modes) + " |\n|---|---|" + "---|" * len(modes)
    s = results["settings"]
    lines = [
        "# meteora-jax eval",
        "",
        f"Adapters: {', '.join(s['adapters']) or 'none'}; greedy, up to {s['max_new_tokens']} new tokens; "
        f"routing temperature: {s['routing_temperature'] or 'the model default (composite: the reference)'}; "
        f"{s['prompts']} prompts.",
        "",
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
    return "\n".join(lines) + "\n"
