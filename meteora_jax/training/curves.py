"""metrics.jsonl -> curves.png: losses and accuracies against the step, whichever a run logs."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from meteora_jax.io.files import write_bytes_atomic

# (key, label, from the held-out evaluation records?) per panel; a series a run does not log is left out
LOSSES = (
    ("lm_loss", "LM loss", False),
    ("gate_loss", "gate loss", False),
    ("response_nll", "held-out response NLL", True),
)
ACCURACIES = (
    ("gate_accuracy", "gate top-1 (train tokens)", False),
    ("dominant_accuracy", "held-out: dominant", True),
    ("last_layer_accuracy", "held-out: last layer", True),
    ("exact_match", "held-out: exact match", True),
    ("token_accuracy", "held-out: token accuracy", True),
)


def _plot(ax, train: Sequence[dict], evals: Sequence[dict], series) -> None:
    for key, label, held_out in series:
        rows = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]] if held_out else [
            (r["step"], r[key]) for r in train if key in r
        ]  # fmt: skip
        if rows:
            steps, values = zip(*rows, strict=True)
            ax.plot(steps, values, "o-" if held_out else "-", label=label)
    ax.set_xlabel("step")
    ax.legend()


def write_curves(records: Sequence[dict], path: str | os.PathLike) -> str:
    """Plots the training losses and accuracies (per step) and the held-out ones (where
    evaluated) against the step; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    _plot(ax_loss, train, evals, LOSSES)
    ax_loss.set_yscale("log")
    _plot(ax_acc, train, evals, ACCURACIES)
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return os.fspath(path)
