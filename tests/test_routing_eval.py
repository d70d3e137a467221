"""The held-out routing figures (`routing_accuracy`) on synthetic routers with known answers.

Three tasks of four prompts each, the same token lengths in every task; every prompt starts with
the three tokens all share (a BOS and the template), then tokens that name their task (task t:
ids 100 (t + 1) + i). A router sees only the left-padded ids, as the model does.
"""

from __future__ import annotations

import numpy as np
import pytest

from meteora_jax.data.samples import HeldOutSample
from meteora_jax.training.routing_eval import routing_accuracy

L, LAYERS, PROJECTIONS = 3, 2, ("q_proj", "down_proj")
PREFIX, PAD = [1, 5, 6], 0
NAMES = [f"layers.{i}.{p}" for i in range(LAYERS) for p in PROJECTIONS]


def _sample(task: int, ids: list[int], labels: list[int]) -> HeldOutSample:
    ids, labels = np.asarray(PREFIX + ids, np.int32), np.asarray([task] * 3 + labels, np.int32)
    return HeldOutSample(f"t{task}", ids, labels, None, "test")


def _heldout() -> dict[str, list[HeldOutSample]]:
    """Task t's prompts hold 2, 6, 4 and 3 task tokens (balanced: the same tokens per task)."""
    return {
        f"t{t}": [_sample(t, [100 * (t + 1) + i for i in range(n)], [t] * n) for n in (2, 6, 4, 3)]
        for t in range(L)
    }


def _task_of_token(ids):
    return ids // 100 - 1  # -1 on the shared prefix and padding


def _row_task(ids_bw):
    """The task of each row (from its task tokens), (B, 1)."""
    return np.max(_task_of_token(ids_bw), axis=1, keepdims=True)


def perfect(ids_bw, mask_bw):
    """Right on every task token; on the shared prefix always wrong (the row's task + 1), so the
    figures are 1.0 only if the prefix is left out."""
    wrong = (_row_task(ids_bw) + 1) % L
    top1 = np.where(_task_of_token(ids_bw) >= 0, _task_of_token(ids_bw), wrong)
    return {name: top1 for name in NAMES}


def constant(ids_bw, mask_bw):
    """Adapter 0, whatever the token."""
    return {name: np.zeros_like(ids_bw) for name in NAMES}


def _accuracy(router, heldout=None, batch_size=5):
    heldout = _heldout() if heldout is None else heldout
    return routing_accuracy(router, heldout, LAYERS, num_adapters=L, pad_id=PAD, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_a_perfect_router_scores_one_everywhere_after_the_shared_prefix(batch_size):
    """batch 5: a last batch of 2 prompts filled up; 16: one batch wider than the prompts."""
    result = _accuracy(perfect, batch_size=batch_size)
    assert result["prompts"] == 12 and result["shared_prefix_tokens"] == 3
    assert result["dominant_accuracy"] == 1.0 and result["last_layer_accuracy"] == 1.0
    assert result["per_projection"] == dict.fromkeys(NAMES, 1.0)
    assert [name.split(".")[1] for name in result["per_projection"]] == ["0", "0", "1", "1"]  # by layer


def test_a_perfect_router_follows_labels_that_switch_inside_a_prompt():
    heldout = _heldout()
    heldout["t1"].append(_sample(1, [101, 102, 301, 302, 303], [0, 0, 2, 2, 2]))  # task ids 0, 0, 2, 2, 2
    result = _accuracy(perfect, heldout)
    assert result["dominant_accuracy"] == 1.0 and result["last_layer_accuracy"] == 1.0


def test_without_a_shared_prefix_every_token_is_scored():
    """The control: one more prompt that starts otherwise ([7, 100]) leaves no prefix shared by
    all, so the perfect router's wrong answers on [1, 5, 6] now count: task tokens / all tokens."""
    heldout = _heldout()
    heldout["t0"].append(HeldOutSample("t0", np.asarray([7, 100], np.int32), np.asarray([0, 0]), None, ""))
    result = _accuracy(perfect, heldout)
    assert result["shared_prefix_tokens"] == 0
    task_tokens = L * (2 + 6 + 4 + 3) + 1
    assert result["per_projection"] == pytest.approx(
        dict.fromkeys(NAMES, task_tokens / (task_tokens + 12 * 3 + 1))
    )


def test_a_constant_router_scores_one_over_the_adapters():
    result = _accuracy(constant)
    assert result["dominant_accuracy"] == pytest.approx(1 / L)
    assert result["last_layer_accuracy"] == pytest.approx(1 / L)
    assert result["per_projection"] == pytest.approx(dict.fromkeys(NAMES, 1 / L))


def test_the_last_layer_figure_reads_the_last_layer_only():
    """Right in the last layer, constant in layer 0: last layer 1.0, layer 0 1 / L."""

    def router(ids_bw, mask_bw):
        right, zero = perfect(ids_bw, mask_bw), constant(ids_bw, mask_bw)
        return {name: (right if name.startswith(f"layers.{LAYERS - 1}.") else zero)[name] for name in NAMES}

    result = _accuracy(router)
    assert result["last_layer_accuracy"] == 1.0
    assert result["per_projection"]["layers.0.q_proj"] == pytest.approx(1 / L)
    assert result["per_projection"]["layers.1.down_proj"] == 1.0


def test_no_prompts_give_no_figures():
    assert _accuracy(perfect, {"t0": []}) == {}
