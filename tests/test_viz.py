"""The routing view: weights per adapter, the HTML page (rendered by headless Chromium), the PNG
heatmap and the JSON record, from a synthetic routing trace whose answers are known."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image as mpimg

from meteora_jax import viz
from meteora_jax.generation import GenerateOutput
from meteora_jax.ops.routing import Routing

NAMES = ("math", "code", "german & <de>", "chat")
PROMPT, NEW = 7, 17
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def synthetic_output(seed=0):
    """Two rows (row 1 left-padded by 3, and stopped 4 tokens early), 2 layers x 2 projections.

    Token t of row 0 is routed mostly to adapter (t // 6) % 4; in layer 1's up_proj the second
    choice gets the larger weight for odd t, so the averaging over projections really matters.
    """
    rng = np.random.default_rng(seed)
    b, t, k = 2, PROMPT + NEW, 2
    ids = np.zeros((b, t, k), np.int32)
    weights = np.zeros((b, t, k), np.float32)
    for pos in range(t):
        first = (pos // 6) % 4
        ids[:, pos] = [first, (first + 1) % 4]
        top = rng.uniform(0.6, 0.95)
        weights[:, pos] = [top, 1 - top]
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0
    mask[1, -4:] = 0
    weights *= mask[..., None]
    routing = {}
    for layer in range(2):
        for proj in ("q_proj", "up_proj"):
            w = weights.copy()
            if (layer, proj) == (1, "up_proj"):
                w[:, 1::2] = w[:, 1::2, ::-1]
            routing[f"layers.{layer}.{proj}"] = Routing(ids=ids, weights=w)
    sequences = rng.integers(3, 50, (b, t))
    return GenerateOutput(sequences=sequences, attention_mask=mask, prompt_length=PROMPT, routing=routing)


def texts_for(out):
    pieces = ["<s>", "[INST]", " x & y", " <b>bold</b>", ' "quoted"', " $5", " [/INST]\n"]
    pieces += [f" w{i}" for i in range(NEW)]
    mask = np.asarray(out.attention_mask).astype(bool)
    return [[p for p, real in zip(pieces, mask[row], strict=True) if real] for row in range(mask.shape[0])]


@pytest.fixture(scope="module")
def traces():
    out = synthetic_output()
    return viz.traces_from_generation(out, texts_for(out), NAMES, titles=["first <row>", "second"])


def test_adapter_weights_average_layers_and_projections():
    out = synthetic_output()
    w_btl = viz.adapter_weights(out.routing, len(NAMES))
    mask = np.asarray(out.attention_mask).astype(bool)
    np.testing.assert_allclose(w_btl.sum(-1)[mask], 1.0, atol=1e-6)
    assert np.all(w_btl[~mask] == 0)
    r = out.routing["layers.0.q_proj"]
    pos = 8  # even: all four projections agree
    first, second = r.ids[0, pos]
    np.testing.assert_allclose(w_btl[0, pos, [first, second]], r.weights[0, pos], atol=1e-6)
    pos = 9  # odd: one of four projections swaps the weights
    top = r.weights[0, pos, 0]
    np.testing.assert_allclose(w_btl[0, pos, r.ids[0, pos, 0]], (3 * top + (1 - top)) / 4, atol=1e-6)


def test_traces_keep_real_tokens_only(traces):
    first, second = traces
    assert len(first.tokens) == PROMPT + NEW and first.prompt_length == PROMPT
    assert len(second.tokens) == PROMPT + NEW - 7 and second.prompt_length == PROMPT - 3
    assert first.weights_tl.shape == (PROMPT + NEW, len(NAMES))
    np.testing.assert_array_equal(first.dominant_t[:18], np.repeat([0, 1, 2], 6))
    with pytest.raises(ValueError, match="texts"):
        out = synthetic_output()
        viz.traces_from_generation(out, [["a"], ["b"]], NAMES)


def test_html_is_self_contained_and_complete(traces):
    page = viz.routing_html(traces, title="Routing <test>")
    assert page.count('class="tok"') == sum(len(t.tokens) for t in traces)
    for forbidden in ("<script", "http://", "https://", "src=", "url(", "@import", "<link"):
        assert forbidden not in page, forbidden
    assert (
        "german &amp; &lt;de&gt;" in page and "Routing &lt;test&gt;" in page and "first &lt;row&gt;" in page
    )
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    # Legend: every adapter with the number of tokens it dominates.
    dominated = np.bincount(np.concatenate([t.dominant_t for t in traces]), minlength=4)
    for name, count in zip(NAMES, dominated, strict=True):
        assert f"{name.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')} " in page
        assert f"({count} tokens)" in page
    # Tooltips name the top adapters with their weights.
    w = traces[0].weights_tl[8]
    assert f"math: {w[1]:.2f}" not in page and f"code: {w[1]:.2f}" in page
    assert page.count('<div class="label">generated</div>') == 2


def test_heatmap_png(traces, tmp_path):
    path = viz.write_routing_heatmap(tmp_path / "heat.png", traces[0])
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 400
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50


def test_json_record_round_trip(tmp_path):
    out = synthetic_output()
    texts = texts_for(out)
    records = [viz.routing_record(out, row, texts[row], NAMES) for row in range(2)]
    path = viz.write_routing_json(tmp_path / "r.json", records)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    first, second = data["sequences"]
    assert first["adapters"] == list(NAMES) and len(first["tokens"]) == PROMPT + NEW
    assert second["tokens"][0]["position"] == 3 and second["tokens"][0]["generated"] is False
    assert sum(t["generated"] for t in second["tokens"]) == NEW - 4
    token = first["tokens"][8]
    assert token["top"][0][0] == "code" and abs(sum(token["weights"]) - 1) < 1e-5
    assert np.asarray(first["layers"]["layers.1.up_proj"]["ids"]).shape == (PROMPT + NEW, 2)
    assert token["id"] == int(out.sequences[0, 8]) and token["text"] == " w1"


def test_many_adapters_get_distinct_colors():
    for n in (3, 10, 15, 28):
        colors = viz.adapter_colors(n)
        assert len(set(colors)) == n


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_chromium_renders_the_page(traces, tmp_path):
    """Headless Chromium screenshot: not blank, and every adapter colour of the legend is drawn."""
    page = viz.write_routing_html(tmp_path / "routing.html", traces)
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1000,700",
        f"file://{page}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    rgb = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert rgb.shape[:2] == (700, 1000)
    colors = {tuple(c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}
    non_white = np.any(rgb < 245, axis=-1).mean()
    assert len(colors) > 100 and non_white > 0.02, f"blank page? {len(colors)} colours, {non_white:.3f} inked"
    for name, color in zip(NAMES, viz.adapter_colors(len(NAMES)), strict=True):
        assert color in colors, f"legend colour of {name} {color} not drawn"


def test_answer_png_has_a_row_of_coloured_token_cells_per_sub_answer(tmp_path):
    """The composite answer picture is as wide as asked (README width), grows in height with
    the rows it needs, and draws the colour of every dominant adapter (its cells)."""
    pieces = ["Sure", ":\n", "1", ". x", "\n2", ". yy", "\n", "3", ". z"]
    spans = [(2, 4), (4, 7), (7, 9)]
    dominant = [3, 3, 0, 0, 1, 1, 0, 3, 3]
    weights_nl = np.eye(len(NAMES))[dominant] * 0.7 + 0.1
    subtasks = ("math", "code", "chat")
    path = viz.write_answer_routing_png(tmp_path / "a.png", pieces, weights_nl, spans, subtasks, NAMES)
    rgb = (mpimg.imread(path)[..., :3] * 255).round().astype(int)
    assert rgb.shape[1] == 960 and 120 < rgb.shape[0] < 400
    drawn = {tuple(c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}
    colors = viz.adapter_colors(len(NAMES))
    assert all(colors[i] in drawn for i in set(dominant)), "a dominant adapter's cells are missing"
    long = [f" w{i}" for i in range(120)]
    narrow = viz.write_answer_routing_png(
        tmp_path / "b.png", ["1", "."] + long, np.eye(4)[np.arange(122) % 4], [(0, 122)], ["math"], NAMES,
        width_px=700,
    )  # fmt: skip
    shape = mpimg.imread(narrow).shape
    assert shape[1] == 700 and shape[0] > rgb.shape[0]  # 120 tokens wrap onto many lines
    with pytest.raises(ValueError, match="2 sub-answer spans for 3 sub-tasks"):
        viz.write_answer_routing_png(tmp_path / "c.png", pieces, weights_nl, spans[:2], subtasks, NAMES)
