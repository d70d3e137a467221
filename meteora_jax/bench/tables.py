"""Markdown tables of bench reports: a header row, right-aligned numbers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def markdown_table(header: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a table whose columns are numbers; `header` names them, "a | b | ..."."""
    lines = [f"| {header} |", "|" + "---:|" * len(header.split(" | "))]
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def base_and_meteora_rows(
    results: Iterable[Mapping], label: str, rate: str, ratio: str, seconds: str
) -> list[tuple[str, ...]]:
    """One row a result: its `label`, the base's and MeteoRA's `rate`, the `ratio`, then the base's
    and MeteoRA's `seconds` in milliseconds."""
    rows = []
    for r in results:
        base, fused = r["base"], r["meteora"]
        rates = (f"{base[rate]:.1f}", f"{fused[rate]:.1f}")
        times = (f"{1e3 * base[seconds]:.1f}", f"{1e3 * fused[seconds]:.1f}")
        rows.append((str(r[label]), *rates, f"{r[ratio]:.2f}", *times))
    return rows


def mixture_title(model: Mapping) -> str:
    """The model line of a report, from `GenerateBenchSettings` as a dict."""
    return (
        f"{model['num_adapters']} adapters (rank {model['rank']}, top-{model['top_k']}) vs base; "
        f"D={model['hidden_size']}, {model['num_hidden_layers']} layers"
    )
