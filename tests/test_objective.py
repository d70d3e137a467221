"""The training objective stated on its own and compared with what the jitted step optimises.

docs/method.md: loss = LM CE (mean over the weighted next-token targets) + lambda * gate CE,
where the gate CE is ONE mean, over every (layer, adapted projection, labelled token), of the
softmax cross-entropy of the raw gate logits x @ G against the token's task label. Here it is
computed in float64 torch (conftest's transformers LLaMA whose adapted projections are the plain
MeteoRA statement, from the same base, PEFT adapters and gates), one sample at a time, with the
gate logits taken from the projections' own inputs (forward hooks); nothing of
`meteora_jax.training.losses` is used. The jitted gradient function of the step
(`training.step.make_gradients`) must give the same value and the same gate gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PROJECTION_BLOCKS, TorchMeteoRA, make_hf_model, make_peft_adapter, torch_meteora_model
from flax import nnx

import meteora_jax as mj
from meteora_jax.ops.routing import RoutingSettings
from meteora_jax.sharding import make_mesh
from meteora_jax.training.losses import objective
from meteora_jax.training.state import shardings_of, split_for_training
from meteora_jax.training.step import batch_sharding, make_gradients
from meteora_jax.training.train_config import TrainConfig

# Their union is six of the seven projections (k_proj has no adapter, so no gate): the gate
# mean counts 2 layers x 6 projections per labelled token.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=3, lora_alpha=6, target_modules=["v_proj", "up_proj", "down_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"]),
}
TOP_K, S = 2, 16


def _samples(vocab: int) -> list[list[dict]]:
    """Rows of samples: ids, a task label per token, and which tokens are LM targets.

    Row 0: one sample and 4 padding slots; row 1: two samples packed; row 2: a composite sample
    whose label switches from 2 to 0, then padding; row 3: a prompt / response sample whose
    prompt (6 tokens) is no LM target (lm_loss="response")."""
    rng = np.random.default_rng(0)

    def sample(labels, target=None):
        n = len(labels)
        target = np.ones(n, np.int64) if target is None else np.asarray(target)
        return {"ids": rng.integers(3, vocab, n), "labels": np.asarray(labels), "target": target}

    return [
        [sample([0] * 12)],
        [sample([1] * 7), sample([2] * 9)],
        [sample([2] * 6 + [0] * 8)],
        [sample([1] * 16, target=[0] * 6 + [1] * 10)],
    ]


def _batch(rows: list[list[dict]]) -> dict[str, np.ndarray]:
    """The rows as the step's batch: segment ids, positions restarting per sample, next-token
    targets and weights within a sample only, labels -1 on padding."""
    b = len(rows)
    batch = {
        "input_ids": np.zeros((b, S), np.int32),
        "segment_ids": np.zeros((b, S), np.int32),
        "positions": np.zeros((b, S), np.int32),
        "lm_targets": np.zeros((b, S), np.int32),
        "lm_weights": np.zeros((b, S), np.float32),
        "gate_labels": np.full((b, S), -1, np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for seg, s in enumerate(row, 1):
            n = len(s["ids"])
            at = slice(start, start + n)
            batch["input_ids"][r, at], batch["segment_ids"][r, at] = s["ids"], seg
            batch["positions"][r, at], batch["gate_labels"][r, at] = np.arange(n), s["labels"]
            batch["lm_targets"][r, start : start + n - 1] = s["ids"][1:]
            batch["lm_weights"][r, start : start + n - 1] = s["target"][1:]
            start += n
    return batch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    _, base = make_hf_model(root / "base")
    dirs = {
        name: make_peft_adapter(base, root / name, seed=i + 1, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(base, adapters=dirs, top_k=TOP_K)
    gates = {}
    for proj in model.moe.targets:
        stacked = np.asarray(getattr(getattr(model.module.layers, PROJECTION_BLOCKS[proj]), proj).gate[...])
        gates.update({(layer, proj): stacked[layer] for layer in range(stacked.shape[0])})
    assert len(gates) == 2 * 6 and "k_proj" not in model.moe.targets
    rows = _samples(model.config.vocab_size)
    return base, list(dirs.values()), model, gates, rows


def _torch_model(world):
    """The float64 torch statement with leaf gates, and {TorchMeteoRA: (layer, projection)}."""
    base, dirs, _, gates, _ = world
    model = torch_meteora_model(base, dirs, gates, top_k=TOP_K, temperature=1.0).double()
    where = {}
    for (layer, proj), _ in gates.items():
        module = getattr(getattr(model.model.layers[layer], PROJECTION_BLOCKS[proj]), proj)
        assert isinstance(module, TorchMeteoRA)
        module.gate = module.gate.detach().double().requires_grad_(True)
        module.experts = [None if e is None else (e[0].double(), e[1].double(), e[2]) for e in module.experts]
        where[module] = (layer, proj)
    return model, where


def _torch_objective(world, gate_loss_weight: float, gate_loss_grad: str):
    """(loss, lm term, gate term, {(layer, projection): dloss/dG}, {key: [gate logits per sample]}).

    Each sample runs alone (positions from 0, attending to itself): what a packed row means."""
    model, where = _torch_model(world)
    inputs = []
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.append((where[m], args[0]))) for m in where]
    lm_sum = lm_count = gate_sum = gate_count = 0.0
    logits_of = {key: [] for key in where.values()}
    for row in world[4]:
        for s in row:
            inputs.clear()
            logits = model(input_ids=torch.as_tensor(s["ids"])[None]).logits[0]  # (n, V)
            log_p = torch.log_softmax(logits, -1)
            weights = torch.as_tensor(s["target"][1:], dtype=torch.float64)
            lm_sum = (
                lm_sum - (log_p[:-1].gather(1, torch.as_tensor(s["ids"][1:])[:, None])[:, 0] * weights).sum()
            )
            lm_count += float(weights.sum())
            labels = torch.as_tensor(s["labels"])
            assert len(inputs) == len(where)  # every gated projection ran once
            for key, x in inputs:
                module = next(m for m, k in where.items() if k == key)
                x = x[0].detach() if gate_loss_grad == "gates" else x[0]
                z = x @ module.gate  # (n, L): the raw gate logits
                logits_of[key].append(z.detach().numpy())
                gate_sum = gate_sum + (torch.logsumexp(z, -1) - z.gather(1, labels[:, None])[:, 0]).sum()
                gate_count += len(labels)
    for hook in hooks:
        hook.remove()
    lm, gate = lm_sum / lm_count, gate_sum / gate_count
    loss = lm + gate_loss_weight * gate
    loss.backward()
    grads = {key: m.gate.grad.numpy() for m, key in where.items()}
    return loss.item(), lm.item(), gate.item(), grads, logits_of


def _jax_objective(world, gate_loss_weight: float, gate_loss_grad: str, grad_accum: int, loss_chunk: int):
    """(loss, lm term, gate term, {(layer, projection): gradient}) of the step's jitted gradients."""
    _, _, model, _, rows = world
    cfg = TrainConfig(
        steps=1,
        gate_loss_weight=gate_loss_weight,
        gate_loss_grad=gate_loss_grad,
        grad_accum=grad_accum,
        loss_chunk=loss_chunk,
    )
    batch = _batch(rows)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        parts, state, frozen = split_for_training(nnx.clone(model.module), cfg)
        params = jax.device_put(state.params, shardings_of(state.params, mesh))
        frozen = jax.device_put(frozen, shardings_of(frozen, mesh))
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}
        gradients = make_gradients(parts, cfg)

        def value_and_grads(params, frozen, batch, key):
            grads, sums, den = gradients(params, frozen, batch, key)
            return (
                objective(sums, den, cfg.gate_loss_weight),
                sums.lm_ce / den.lm,
                sums.gate_ce / den.gate,
                grads,
            )

        loss, lm, gate, grads = jax.jit(value_and_grads)(params, frozen, batch, jax.random.key(0))
    flat = {}
    for path, var in nnx.to_flat_state(grads):
        assert path[-1] == "gate", path
        stacked = np.asarray(var.get_value())
        flat.update({(layer, str(path[-2])): stacked[layer] for layer in range(stacked.shape[0])})
    return float(loss), float(lm), float(gate), flat


def test_gate_logits_are_the_projection_inputs_of_the_model(world):
    """The torch statement's gate logits (x @ G at each adapted projection's input) equal the raw
    gate logits the JAX model routes a packed batch with, sample by sample."""
    _, _, model, _, rows = world
    batch = _batch(rows)
    out = model.module(
        jnp.asarray(batch["input_ids"]),
        positions=jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
        routing=RoutingSettings(jnp.float32(1.0), top_k=TOP_K, return_logits=True),
        return_routing=True,
    )
    *_, logits_of = _torch_objective(world, 1.0, "all")
    worst = 0.0
    for (layer, proj), per_sample in logits_of.items():
        jax_bsl = np.asarray(out.routing[f"layers.{layer}.{proj}"].logits)
        samples = iter(per_sample)
        for r, row in enumerate(rows):
            start = 0
            for s in row:
                n = len(s["ids"])
                worst = max(worst, float(np.max(np.abs(jax_bsl[r, start : start + n] - next(samples)))))
                start += n
    assert worst <= 1e-4, worst


@pytest.mark.parametrize(
    ("gate_loss_weight", "gate_loss_grad", "grad_accum", "loss_chunk"),
    [
        (50.0, "gates", 1, 512),
        (0.5, "gates", 2, 512),
        (0.5, "all", 1, 512),
        (0.5, "all", 1, 5),
        (0.5, "all", 2, 0),
    ],
)
def test_the_step_optimises_the_stated_objective(
    world, gate_loss_weight, gate_loss_grad, grad_accum, loss_chunk, record_error
):
    """Value (and each term) to 1e-5 relative, gate gradients to 1e-5 of the largest; lambda 50
    (the reference) and 0.5 (both terms weigh), the gate term's gradient held to the gates or
    not, one batch or two micro-batches, the LM loss over the whole logits (0), one chunk (512)
    or 5 slots at a time (16 slots: three chunks and a padded one)."""
    want, want_lm, want_gate, want_grads = _torch_objective(world, gate_loss_weight, gate_loss_grad)[:4]
    got, got_lm, got_gate, grads = _jax_objective(
        world, gate_loss_weight, gate_loss_grad, grad_accum, loss_chunk
    )
    if gate_loss_weight < 1:
        assert 0.05 < gate_loss_weight * want_gate / want < 0.95  # both terms shape the loss
    for name, g, w in (("loss", got, want), ("lm", got_lm, want_lm), ("gate", got_gate, want_gate)):
        assert abs(g - w) <= 1e-5 * abs(w), (name, g, w)
    assert grads.keys() == want_grads.keys()
    scale = max(float(np.max(np.abs(g))) for g in want_grads.values())
    err = max(float(np.max(np.abs(grads[k] - want_grads[k]))) for k in want_grads)
    record_error(
        f"gate grads, lambda {gate_loss_weight}, {gate_loss_grad}, accum {grad_accum}, chunk {loss_chunk}",
        err / scale,
    )
    assert err <= 1e-5 * scale
