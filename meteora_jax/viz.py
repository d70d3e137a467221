"""The routing view: which adapter the gates chose, token by token (the paper's telling picture).

Dimensions: B batch, T tokens, L adapters, k chosen per token.

A routing trace ({"layers.{i}.{projection}": Routing with ids / weights (B, T, k)}) is reduced
per token to the weight each adapter received, averaged over every layer and projection
(`adapter_weights`); the adapter with the most is the token's dominant one. From that:

- `routing_html`: a self-contained page (inline CSS, no scripts or external assets) showing
  the prompt and the generated text token by token, each token's background the colour of
  its dominant adapter, its intensity that adapter's weight, with a legend and a tooltip per
  token listing its top adapters;
- `write_routing_heatmap`: a PNG heatmap (matplotlib, Agg) of adapter weight over positions;
- `write_answer_routing_png`: a PNG of one composite answer at README width, a block of token
  cells per sub-answer, each cell the colour of its token's dominant adapter;
- `routing_record`: the same as JSON-ready data, with the full per-layer routing.
"""

from __future__ import annotations

import colorsys
import dataclasses
import html
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from meteora_jax.errors import MeteoRAError
from meteora_jax.io.files import write_bytes_atomic, write_text_atomic
from meteora_jax.ops.routing import Routing

_TOP_SHOWN = 3  # adapters listed in a token's tooltip
_MIN_ALPHA = 0.12  # so that a weakly routed token still shows its colour


def adapter_weights(routing: Mapping[str, Routing], num_adapters: int) -> np.ndarray:
    """(B, T, L) weight per adapter and token, averaged over all layers and projections.

    A token routed normally gets weights summing to 1; one forced to "no adapter" (or a
    padding token, whose weights are 0) gets 0.
    """
    if not routing:
        raise MeteoRAError("the routing trace is empty (was the model fused with adapters?)")
    total_btl = None
    for r in routing.values():
        ids_btk, w_btk = np.asarray(r.ids), np.asarray(r.weights, np.float64)
        one_hot_btkl = ids_btk[..., None] == np.arange(num_adapters)
        part_btl = np.einsum("btk,btkl->btl", w_btk, one_hot_btkl)
        total_btl = part_btl if total_btl is None else total_btl + part_btl
    return total_btl / len(routing)


def dominant_adapters(weights_tl: np.ndarray) -> np.ndarray:
    """(..., T) the adapter with the most weight per token of `adapter_weights`' (..., T, L);
    -1 where no adapter has any (a token forced to no adapter, padding)."""
    weights_tl = np.asarray(weights_tl)
    return np.where(weights_tl.sum(-1) > 0, np.argmax(weights_tl, axis=-1), -1)


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    """One sequence's routing, reduced for display: the first `prompt_length` tokens are the prompt."""

    tokens: tuple[str, ...]  # T display pieces
    weights_tl: np.ndarray  # (T, L) from `adapter_weights`
    adapter_names: tuple[str, ...]
    prompt_length: int
    title: str = ""

    def __post_init__(self):
        t, n = len(self.tokens), len(self.adapter_names)
        if self.weights_tl.shape != (t, n):
            raise MeteoRAError(f"weights_tl has shape {self.weights_tl.shape}, expected ({t}, {n})")
        if not 0 <= self.prompt_length <= t:
            raise MeteoRAError(f"prompt_length={self.prompt_length} is outside [0, {t}]")

    @property
    def dominant_t(self) -> np.ndarray:
        return np.argmax(self.weights_tl, axis=-1)


def traces_from_generation(output, texts: Sequence[Sequence[str]], adapter_names, titles=None) -> list:
    """One RoutingTrace per row of a `GenerateOutput` (with routing), over its real tokens only.

    texts[b]: the display piece of every real token of row b (e.g. `data.prompts.token_texts`).
    """
    weights_btl = adapter_weights(output.routing, len(adapter_names))
    mask_bt = np.asarray(output.attention_mask).astype(bool)
    traces = []
    for b in range(mask_bt.shape[0]):
        real_t = mask_bt[b]
        if len(texts[b]) != int(real_t.sum()):
            raise MeteoRAError(f"row {b} has {int(real_t.sum())} real tokens but {len(texts[b])} texts")
        traces.append(
            RoutingTrace(
                tokens=tuple(texts[b]),
                weights_tl=weights_btl[b][real_t],
                adapter_names=tuple(adapter_names),
                prompt_length=int(real_t[: output.prompt_length].sum()),
                title=titles[b] if titles else f"sequence {b}",
            )
        )
    return traces


def adapter_colors(n: int) -> list[tuple[int, int, int]]:
    """n distinct RGB colours: matplotlib's tab10 / tab20, evenly spaced hues beyond 20."""
    from matplotlib import colormaps  # noqa: PLC0415

    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        rgb = [cmap(i)[:3] for i in range(n)]
    else:
        rgb = [colorsys.hls_to_rgb(i / n, 0.5 - 0.15 * (i % 2), 0.75) for i in range(n)]
    return [tuple(int(round(255 * c)) for c in color) for color in rgb]


# ------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 6px; }
.meta { color: #666; font-size: 13px; margin-bottom: 12px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 8px 0 16px; font-size: 13px; }
.legend span.sw { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
  vertical-align: -2px; margin-right: 5px; border: 1px solid rgba(0,0,0,.2); }
.label { font-size: 12px; color: #666; text-transform: uppercase; letter-spacing: .05em; margin: 10px 0 4px; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 15px; line-height: 2.0;
  white-space: pre-wrap; word-break: break-word; border: 1px solid #ddd; border-radius: 6px;
  padding: 8px 10px; }
.tok { position: relative; border-radius: 3px; padding: 1px 0; }
.tok:hover { outline: 2px solid #333; }
.tok:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 1.9em; z-index: 10;
  white-space: pre; background: #222; color: #fff; font-size: 12px; line-height: 1.4;
  padding: 5px 8px; border-radius: 4px; pointer-events: none; }
"""


def _display(piece: str) -> str:
    shown = piece.replace("\n", "\u21b5\n").replace("\t", "\u21e5")
    return shown if shown else "\u2205"  # an empty piece still gets a visible cell


def _token_span(trace: RoutingTrace, t: int, colors) -> str:
    w_l = trace.weights_tl[t]
    best = int(np.argmax(w_l))
    r, g, b = colors[best]
    alpha = _MIN_ALPHA + (1 - _MIN_ALPHA) * float(np.clip(w_l[best], 0, 1))
    top = np.argsort(-w_l, kind="stable")[:_TOP_SHOWN]
    lines = [f"#{t} {trace.tokens[t]!r}"]
    lines += [f"{trace.adapter_names[i]}: {w_l[i]:.2f}" for i in top if w_l[i] > 0]
    if w_l.sum() == 0:
        lines.append("no adapter")
        alpha = 0.0
    # Light text on dark backgrounds: the luminance of the colour as blended onto white.
    weights = (0.2126, 0.7152, 0.0722)
    luminance = sum(c * (alpha * x + (1 - alpha) * 255) for c, x in zip(weights, (r, g, b), strict=True))
    ink = "#fff" if luminance < 0.5 * 255 else "#111"
    return (
        f'<span class="tok" style="background: rgba({r},{g},{b},{alpha:.2f}); color: {ink}" '
        f'data-tip="{html.escape(chr(10).join(lines))}">{html.escape(_display(trace.tokens[t]))}</span>'
    )


def _legend(traces: Sequence[RoutingTrace], colors) -> str:
    names = traces[0].adapter_names
    counts = np.zeros(len(names), int)
    for trace in traces:
        routed = trace.weights_tl.sum(-1) > 0
        counts += np.bincount(trace.dominant_t[routed], minlength=len(names))
    items = [
        f'<span><span class="sw" style="background: rgb{colors[i]}"></span>{html.escape(name)} '
        f'<span class="meta">({counts[i]} tokens)</span></span>'
        for i, name in enumerate(names)
    ]
    return f'<div class="legend">{"".join(items)}</div>'


def _one_line(title: str, width: int = 60) -> str:
    """A plot title from a prompt: its first line, cut to `width` characters (a composite prompt
    runs to hundreds of characters over many lines)."""
    first = title.strip().split("\n", 1)[0]
    return first if len(first) <= width and "\n" not in title.strip() else first[: width - 3].rstrip() + "..."


def routing_html(traces: Sequence[RoutingTrace], title: str = "MeteoRA routing", subtitle: str = "") -> str:
    """A self-contained HTML page of one or more traces (sharing one adapter list)."""
    if not traces:
        raise MeteoRAError("routing_html needs at least one trace")
    names = traces[0].adapter_names
    if any(t.adapter_names != names for t in traces):
        raise MeteoRAError("all traces must share one adapter list")
    colors = adapter_colors(len(names))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<div class="meta">Background: the dominant adapter of each token (most routing weight, averaged '
        "over all layers and projections); intensity: that weight. Hover a token for its top adapters. "
        f"{html.escape(subtitle)}</div>",
        _legend(traces, colors),
    ]
    for trace in traces:
        parts.append(f"<h2>{html.escape(trace.title)}</h2>")
        for label, span in (
            ("prompt", range(trace.prompt_length)),
            ("generated", range(trace.prompt_length, len(trace.tokens))),
        ):
            if len(span):
                tokens = "".join(_token_span(trace, t, colors) for t in span)
                parts.append(f'<div class="label">{label}</div><div class="text">{tokens}</div>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_routing_html(path: str | os.PathLike, traces: Sequence[RoutingTrace], **kw) -> str:
    """Writes `routing_html(traces, **kw)` to `path` (UTF-8, atomically); returns the path."""
    path = os.fspath(path)
    write_text_atomic(path, routing_html(traces, **kw))
    return path


# ------------------------------------------------------------------------------ PNG heatmap

_MAX_TICK_LABELS = 80


def _tick_label(piece: str) -> str:
    # "$" would start matplotlib mathtext; newlines would break the axis.
    return piece.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t") or "\u2205"


def write_routing_heatmap(path: str | os.PathLike, trace: RoutingTrace, *, dpi: int = 120) -> str:
    """Writes a PNG heatmap of adapter weight (rows) over token positions (columns), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    t, n = trace.weights_tl.shape
    fig = Figure(figsize=(min(40.0, max(6.0, 2.5 + 0.22 * t)), 1.6 + 0.3 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        trace.weights_tl.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_yticks(range(n), trace.adapter_names, fontsize=8)
    if t <= _MAX_TICK_LABELS:
        ax.set_xticks(range(t), [_tick_label(p) for p in trace.tokens], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("token position")
    if 0 < trace.prompt_length < t:
        ax.axvline(trace.prompt_length - 0.5, color="white", linewidth=1.5, linestyle="--")
    ax.set_title(f"{_one_line(trace.title)}: adapter weight per token (prompt | generated)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean weight", fraction=0.03, pad=0.01)
    path = os.fspath(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    write_bytes_atomic(path, png.getvalue())
    return path


# ------------------------------------------------------------------------------ PNG answer rows

_FONT_PT = 9  # monospace; DejaVu Sans Mono advances 0.602 em per character
_ADVANCE_EM = 0.602
_CELL_CHARS = 12  # a longer token is cut, with an ellipsis
_LINE_PX, _CELL_GAP_PX, _MARGIN_PX, _LABEL_PX = 22, 2, 10, 190  # pixels
_NO_ROUTE_RGB = (200, 200, 200)


def _cell_text(piece: str) -> str:
    shown = piece.replace("\n", "\u21b5").replace("\t", "\u21e5")
    shown = shown if shown.strip() else shown.replace(" ", "\u2423")
    shown = shown or "\u2205"
    return shown if len(shown) <= _CELL_CHARS else shown[: _CELL_CHARS - 1] + "\u2026"


def _ink(rgb) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#ffffff" if luminance < 0.5 * 255 else "#111111"


def _wrap(widths: Sequence[float], room: float) -> list[list[int]]:
    """Indices of cells of the given pixel widths, packed left to right into lines of `room` px."""
    lines, x = [[]], 0.0
    for i, w in enumerate(widths):
        if lines[-1] and x + w > room:
            lines.append([])
            x = 0.0
        lines[-1].append(i)
        x += w + _CELL_GAP_PX
    return lines


def _answer_blocks(spans, subtasks, n: int) -> list[tuple[str, str | None, range]]:
    """(label, expected sub-task, tokens) per block of the answer picture: the tokens before the
    first sub-answer (if any), then each sub-answer in sub-task order."""
    first = min((span[0] for span in spans if span is not None), default=n)
    label = "(preamble)" if first < n else "(no numbered line)"
    blocks = [(label, None, range(first))] if first else []
    for i, (task, span) in enumerate(zip(subtasks, spans, strict=True), 1):
        blocks.append((f"{i}. {task}", task, range(*span) if span else range(0)))
    return blocks


def write_answer_routing_png(
    path: str | os.PathLike,
    pieces: Sequence[str],
    weights_nl: np.ndarray,
    spans: Sequence[tuple[int, int] | None],
    subtasks: Sequence[str],
    adapter_names: Sequence[str],
    *,
    title: str = "",
    width_px: int = 960,
    dpi: int = 100,
) -> str:
    """Writes a PNG of one generated composite answer, atomically: a block of rows per sub-answer
    (labelled "i. <expected sub-task>" beside that adapter's colour), of token cells showing each
    token's text on the colour of its dominant adapter (grey: none), under a legend.

    pieces / weights_nl (N, L): the display piece and adapter weights of each generated token;
    spans: the [start, end) tokens of each sub-answer (None: its line is missing), as
    `evaluation.switching.answer_spans` finds them; tokens before the first get a block of their
    own. The image is `width_px` wide at `dpi`, as high as its rows need.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    weights_nl = np.asarray(weights_nl)
    if weights_nl.shape != (len(pieces), len(adapter_names)):
        raise MeteoRAError(
            f"weights_nl has shape {weights_nl.shape}, expected ({len(pieces)}, {len(adapter_names)})"
        )
    if len(spans) != len(subtasks):
        raise MeteoRAError(f"{len(spans)} sub-answer spans for {len(subtasks)} sub-tasks")
    colors = [np.array(c) / 255 for c in adapter_colors(len(adapter_names))]
    dominant_n = dominant_adapters(weights_nl)
    char_px = _FONT_PT * dpi / 72 * _ADVANCE_EM
    shown_n = [_cell_text(p) for p in pieces]
    blocks = _answer_blocks(spans, subtasks, len(pieces))
    legend = _wrap([len(name) * char_px + 28 for name in adapter_names], width_px - 2 * _MARGIN_PX)
    room = width_px - 2 * _MARGIN_PX - _LABEL_PX
    rows = [_wrap([len(shown_n[t]) * char_px + 6 for t in tokens], room) for _, _, tokens in blocks]
    height = 2 * _MARGIN_PX + _LINE_PX * (1 + len(legend)) + sum(_LINE_PX * len(r) + 6 for r in rows)
    fig = Figure(figsize=(width_px / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, width_px), ylim=(height, 0))
    ax.axis("off")
    text = {"fontsize": _FONT_PT, "family": "monospace", "va": "center", "parse_math": False}
    y = _MARGIN_PX + _LINE_PX / 2
    ax.text(_MARGIN_PX, y, _one_line(title or "dominant adapter per generated token", 140), **text)
    for line in legend:
        y, x = y + _LINE_PX, _MARGIN_PX
        for i in line:
            ax.add_patch(Rectangle((x, y - 7), 14, 14, color=colors[i]))
            ax.text(x + 18, y, adapter_names[i], **text)
            x += len(adapter_names[i]) * char_px + 28 + _CELL_GAP_PX
    y += _LINE_PX / 2
    label_chars = int((_LABEL_PX - 24) / char_px)
    for (label, task, tokens), lines in zip(blocks, rows, strict=True):
        ax.axhline(y + 3, color="#888888", linewidth=0.8)  # the sub-answer boundary
        top = y + 6
        if task in adapter_names:
            swatch = colors[list(adapter_names).index(task)]
            ax.add_patch(Rectangle((_MARGIN_PX, top + 4), 10, _LINE_PX - 8, color=swatch))
        label = label if len(label) <= label_chars else label[: label_chars - 1] + "\u2026"
        ax.text(_MARGIN_PX + 16, top + _LINE_PX / 2, label if len(tokens) else f"{label}: no line", **text)
        for row, line in enumerate(lines):
            x, cy = _MARGIN_PX + _LABEL_PX, top + row * _LINE_PX
            for t in (tokens[j] for j in line):
                rgb = colors[dominant_n[t]] if dominant_n[t] >= 0 else np.array(_NO_ROUTE_RGB) / 255
                w = len(shown_n[t]) * char_px + 6
                ax.add_patch(Rectangle((x, cy + 2), w, _LINE_PX - 4, color=rgb))
                ax.text(x + 3, cy + _LINE_PX / 2, shown_n[t], color=_ink(255 * rgb), **text)
                x += w + _CELL_GAP_PX
        y = top + _LINE_PX * len(lines)
    path = os.fspath(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    write_bytes_atomic(path, png.getvalue())
    return path


# ------------------------------------------------------------------------------ JSON


def routing_record(output, row: int, texts: Sequence[str], adapter_names: Sequence[str]) -> dict:
    """JSON-ready routing of one row of a `GenerateOutput`: per-token summary and every layer.

    "tokens": [{"position", "id", "text", "generated", "weights" (L), "top": [[name, w], ...]}]
    over real tokens; "layers": {"layers.{i}.{projection}": {"ids": (T, k), "weights": (T, k)}}.
    """
    mask_t = np.asarray(output.attention_mask[row]).astype(bool)
    ids_t = np.asarray(output.sequences[row])[mask_t]
    weights_tl = adapter_weights(output.routing, len(adapter_names))[row][mask_t]
    positions = np.nonzero(mask_t)[0]
    tokens = []
    for j, (pos, token_id) in enumerate(zip(positions, ids_t, strict=True)):
        top = np.argsort(-weights_tl[j], kind="stable")[:_TOP_SHOWN]
        tokens.append(
            {
                "position": int(pos),
                "id": int(token_id),
                "text": texts[j],
                "generated": bool(pos >= output.prompt_length),
                "weights": [round(float(w), 6) for w in weights_tl[j]],
                "top": [
                    [adapter_names[i], round(float(weights_tl[j, i]), 6)] for i in top if weights_tl[j, i] > 0
                ],
            }
        )
    layers = {
        key: {
            "ids": np.asarray(r.ids[row])[mask_t].tolist(),
            "weights": np.round(np.asarray(r.weights[row], np.float64)[mask_t], 6).tolist(),
        }
        for key, r in output.routing.items()
    }
    return {"adapters": list(adapter_names), "tokens": tokens, "layers": layers}


def write_routing_json(path: str | os.PathLike, records: Sequence[dict]) -> str:
    """Writes routing records (`routing_record`) as one JSON document {"sequences": [...]}, atomically."""
    path = os.fspath(path)
    write_text_atomic(path, json.dumps({"sequences": list(records)}))
    return path
