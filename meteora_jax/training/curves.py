"""metrics.jsonl -> curves.png: the losses and the gate accuracy against the step."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from meteora_jax.io.files import write_bytes_atomic


def write_curves(records: Sequence[dict], path: str | os.PathLike) -> str:
    """Plots lm_loss, gate_loss and gate_accuracy (training) and the held-out routing accuracy
    (where evaluated) against the step; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["lm_loss"] for r in train], label="LM loss")
    ax_loss.plot(steps, [r["gate_loss"] for r in train], label="gate loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot(steps, [r["gate_accuracy"] for r in train], label="gate top-1 (train tokens)")
    if evals:
        eval_steps = [r["step"] for r in evals]
        ax_acc.plot(
            eval_steps, [r["eval"]["dominant_accuracy"] for r in evals], "o-", label="held-out: dominant"
        )
        ax_acc.plot(
            eval_steps, [r["eval"]["last_layer_accuracy"] for r in evals], "s-", label="held-out: last layer"
        )
    ax_acc.set_xlabel("step")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return os.fspath(path)
