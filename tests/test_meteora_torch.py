"""The MeteoRA PyTorch reference checkpoint (one `model.safetensors` with the PEFT-wrapped state dict).

Reference files are written here by a small torch writer that lays the state dict out as
MeteoRA's `PeftModel` saves it (gate rows random), loaded with `load_model(gates=FILE)`, and
checked against a torch statement of docs/method.md hooked into transformers' projections.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from conftest import (
    PROJECTION_BLOCKS,
    TorchMeteoRA,
    make_hf_model,
    make_peft_adapter,
    max_abs,
    peft_experts,
    torch_logits,
)

import meteora_jax as mj
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.io import meteora_torch
from meteora_jax.io.checkpoint import model_params

TOL = 1e-4
RANK = 4
PROJS = tuple(PROJECTION_BLOCKS)
ADAPTERS = {  # one shared rank, as the reference requires; "gamma" leaves three projections alone
    "alpha": dict(r=RANK, lora_alpha=8, target_modules="all-linear"),
    "beta": dict(r=RANK, lora_alpha=6, use_rslora=True, target_modules="all-linear"),
    "gamma": dict(r=RANK, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
}
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    hf_model, base_dir = make_hf_model(root / "base")
    dirs = {
        n: make_peft_adapter(base_dir, root / n, seed=i + 1, **kw)
        for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    experts = [peft_experts(base_dir, d) for d in dirs.values()]
    gates = random_gates(hf_model.config, len(dirs), seed=5)
    return dict(root=root, hf=hf_model, base=base_dir, dirs=dirs, experts=experts, gates=gates)


def ids_of(seed, batch=2, length=33, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def shapes(config, proj) -> tuple[int, int]:
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}.get(
        proj, (f, d) if proj == "down_proj" else (d, f)
    )


def random_gates(config, n, seed) -> dict:
    """(layer, projection) -> gate rows (L, in), random, as the reference's moe_gate.weight."""
    g = torch.Generator().manual_seed(seed)
    return {
        (layer, p): torch.randn(n, shapes(config, p)[0], generator=g) * 3 / math.sqrt(shapes(config, p)[0])
        for layer in range(config.num_hidden_layers)
        for p in PROJS
    }


def reference_state_dict(hf_model, gates, experts=None, rank=RANK, base=True) -> dict:
    """The state dict MeteoRA's PeftModel saves: wrapped projections, stacked LoRA, gate rows."""
    sd = {}
    targets = {p for (_, p) in gates}
    if base:
        for name, tensor in hf_model.state_dict().items():
            parts = name.split(".")
            wrapped = name.endswith("_proj.weight") and parts[-2] in targets
            sd[PREFIX + (name[: -len("weight")] + "base_layer.weight" if wrapped else name)] = tensor.clone()
    for (layer, proj), gate in gates.items():
        key = f"{PREFIX}model.layers.{layer}.{PROJECTION_BLOCKS[proj]}.{proj}."
        sd[key + "moe_gate.weight"] = gate.clone()
        if experts is not None:
            d_in, d_out = shapes(hf_model.config, proj)
            a, b = torch.zeros(len(experts) * rank, d_in), torch.zeros(d_out, len(experts) * rank)
            for i, expert in enumerate(experts):
                if (layer, proj) in expert:
                    a[i * rank : (i + 1) * rank], b[:, i * rank : (i + 1) * rank] = expert[(layer, proj)][:2]
            sd[key + "lora_A.weight"], sd[key + "lora_B.weight"] = a, b
    return sd


def save(sd, path) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, os.fspath(path))
    return os.fspath(path)


def torch_statement(base_dir, gates, experts, top_k=2, temperature=1.0):
    """transformers' LLaMA with every gated projection replaced by docs/method.md (a loop over adapters)."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for (layer, proj), gate in gates.items():
        block = getattr(model.model.layers[layer], PROJECTION_BLOCKS[proj])
        per_adapter = [e.get((layer, proj)) for e in experts]
        setattr(block, proj, TorchMeteoRA(getattr(block, proj), gate.T, per_adapter, top_k, temperature))
    return model


def trained_experts(experts, seed):
    """Other LoRA weights for the same modules, as if MeteoRA had trained the stacks too."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            k: (a + 0.1 * torch.randn(a.shape, generator=g), -b + 0.1 * torch.randn(b.shape, generator=g), s)
            for k, (a, b, s) in e.items()
        }
        for e in experts
    ]


def no_leftovers(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


# ----------------------------------------------------------------------------- reading


def test_gates_only_file_equals_torch_statement(world, record_error):
    path = save(
        reference_state_dict(world["hf"], world["gates"], base=False), world["root"] / "gates.safetensors"
    )
    model = mj.load_model(world["base"], adapters=world["dirs"], gates=path, top_k=2)
    assert model.adapter_names == tuple(ADAPTERS)
    ids = ids_of(1)
    want = torch_logits(torch_statement(world["base"], world["gates"], world["experts"]), ids)
    err = record_error("gates-only reference file, k=2 vs torch statement", max_abs(model(ids).logits, want))
    assert err <= TOL
    stacked = np.asarray(model.module.layers.mlp.down_proj.gate[...])  # (Y, in, L)
    np.testing.assert_array_equal(stacked[1], world["gates"][(1, "down_proj")].numpy().T)


@pytest.fixture(scope="module")
def full_file(world):
    """A whole reference state dict whose stacked LoRA differs from the adapter folders'."""
    trained = trained_experts(world["experts"], seed=9)
    sd = reference_state_dict(world["hf"], world["gates"], trained)
    return save(sd, world["root"] / "full.safetensors"), trained


def test_stacked_lora_replaces_adapter_weights(world, full_file, record_error):
    path, trained = full_file
    model = mj.load_model(world["base"], adapters=world["dirs"], gates=path, top_k=2)
    ids = ids_of(2)
    got = np.asarray(model(ids).logits)
    want = torch_logits(torch_statement(world["base"], world["gates"], trained), ids)
    err = record_error("reference file with stacked LoRA, k=2 vs torch statement", max_abs(got, want))
    assert err <= TOL
    folder = torch_logits(torch_statement(world["base"], world["gates"], world["experts"]), ids)
    assert max_abs(got, folder) > 100 * TOL, "the file's LoRA weights must replace the folders'"
    # Scales stay those of the adapters' configs: alpha / r, and alpha / sqrt(r) for rsLoRA.
    np.testing.assert_allclose(np.asarray(model.module.layers.self_attn.q_proj.scale[...])[0], [2, 3, 1])


def test_write_reference_round_trip(world, full_file, tmp_path, record_error):
    path, _ = full_file
    model = mj.load_model(world["base"], adapters=world["dirs"], gates=path, top_k=2)
    out = meteora_torch.write_reference(model, world["base"], tmp_path / "export")
    written = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    source = safetensors.torch.load_file(path)
    assert written.keys() == source.keys()
    assert all(torch.equal(written[k], source[k]) for k in source), "write(read(file)) == file"
    order = json.loads((tmp_path / "export" / "adapter_order.json").read_text())
    assert order["adapter_order"] == list(ADAPTERS) and order["rank"] == RANK and not order["padded"]
    assert [a["alpha"] for a in order["adapters"]] == [8, 6, 4] and order["adapters"][1]["use_rslora"]
    again = mj.load_model(world["base"], adapters=world["dirs"], gates=os.path.join(out, "model.safetensors"))
    ids = ids_of(3)
    err = record_error("write_reference -> read, logits", max_abs(again(ids).logits, model(ids).logits))
    assert err <= 1e-6
    assert no_leftovers(tmp_path)


def test_mixed_ranks_are_zero_padded(world, tmp_path, record_error):
    small = make_peft_adapter(
        world["base"], tmp_path / "small", seed=11, r=2, lora_alpha=2, target_modules="all-linear"
    )
    dirs = {"alpha": world["dirs"]["alpha"], "small": small}
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(world["base"], adapters=dirs, seed=4)
    out = meteora_torch.write_reference(model, world["base"], tmp_path / "mixed")
    order = json.loads((tmp_path / "mixed" / "adapter_order.json").read_text())
    assert order["padded"] and order["rank"] == 4 and [a["rank"] for a in order["adapters"]] == [4, 2]
    written = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    lora_a = written[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert lora_a.shape == (8, 64) and not lora_a[6:].any() and lora_a[4:6].any()
    again = mj.load_model(world["base"], adapters=dirs, gates=os.path.join(out, "model.safetensors"))
    ids = ids_of(4)
    err = record_error(
        "mixed ranks padded, write -> read, logits", max_abs(again(ids).logits, model(ids).logits)
    )
    assert err <= 1e-6


# ----------------------------------------------------------------------------- refusals


def refused(world, sd, name, adapters=None, top_k=2) -> str:
    path = save(sd, world["root"] / name)
    with pytest.raises(CheckpointError) as info:
        mj.load_model(world["base"], adapters=adapters or world["dirs"], gates=path, top_k=top_k)
    message = str(info.value)
    assert path in message
    return message


def test_refuses_wrong_number_of_adapters(world):
    two = {k: world["dirs"][k] for k in ("alpha", "beta")}
    message = refused(
        world, reference_state_dict(world["hf"], world["gates"], base=False), "l3.safetensors", two
    )
    assert "gates for 3 adapters" in message and "2 adapters were given (alpha, beta)" in message
    assert "model.layers.0.self_attn.q_proj.moe_gate.weight" in message and "(3, 64)" in message


def test_refuses_mis_shaped_gate(world):
    gates = dict(world["gates"])
    gates[(1, "o_proj")] = torch.randn(3, 65)
    message = refused(world, reference_state_dict(world["hf"], gates, base=False), "shape.safetensors")
    assert (
        f"{PREFIX}model.layers.1.self_attn.o_proj.moe_gate.weight has shape (3, 65), expected (3, 64)"
        in message
    )


def test_refuses_missing_gate(world):
    sd = reference_state_dict(world["hf"], world["gates"], base=False)
    key = f"{PREFIX}model.layers.1.mlp.up_proj.moe_gate.weight"
    del sd[key]
    assert f"missing gate {key}" in refused(world, sd, "missing.safetensors")


def test_refuses_base_weight_difference(world):
    sd = reference_state_dict(world["hf"], world["gates"], world["experts"])
    key = f"{PREFIX}model.layers.1.mlp.down_proj.base_layer.weight"
    sd[key] = sd[key].clone()
    sd[key][3, 5] += 0.25
    message = refused(world, sd, "base.safetensors")
    assert f"tensor {key} differs from model.layers.1.mlp.down_proj.weight" in message
    assert "max abs difference 0.25" in message and world["base"] in message


def test_refuses_gates_of_untargeted_projections(world):
    gamma = {"gamma": world["dirs"]["gamma"]}
    gates = {k: v[2:] for k, v in world["gates"].items()}  # one adapter, but gates for all 7 projections
    message = refused(
        world, reference_state_dict(world["hf"], gates, base=False), "untargeted.safetensors", gamma, 1
    )
    assert "k_proj, o_proj, gate_proj, which none of the given adapters (gamma) targets" in message


def test_refuses_lora_outside_an_adapters_modules(world):
    experts = [dict(e) for e in world["experts"]]
    a, b, s = experts[0][(0, "k_proj")]
    experts[2][(0, "k_proj")] = (a, b, s)  # gamma does not adapt k_proj
    message = refused(
        world, reference_state_dict(world["hf"], world["gates"], experts), "outside.safetensors"
    )
    assert "block 2 (adapter 'gamma') is nonzero although it does not adapt this module" in message
    assert "model.layers.0.self_attn.k_proj.lora_A.weight" in message


def test_refuses_reference_file_without_adapters(world):
    path = save(
        reference_state_dict(world["hf"], world["gates"], base=False), world["root"] / "alone.safetensors"
    )
    with pytest.raises(ConfigError, match="stores no adapter order or scalings: pass adapters=") as info:
        mj.load_model(world["base"], gates=path)
    assert path in str(info.value)


def test_refuses_a_file_that_is_not_meteora(world):
    base_file = os.path.join(world["base"], "model.safetensors")
    with pytest.raises(CheckpointError, match="not a MeteoRA checkpoint"):
        mj.load_model(world["base"], adapters=world["dirs"], gates=base_file)


def test_write_refuses_existing_output_and_leaves_nothing_half_written(world, tmp_path, monkeypatch):
    path = save(reference_state_dict(world["hf"], world["gates"], base=False), tmp_path / "g.safetensors")
    model = mj.load_model(world["base"], adapters=world["dirs"], gates=path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out} already exists"):
        meteora_torch.write_reference(model, world["base"], out)
    assert os.listdir(out) == ["keep.txt"]

    def broken(tensors, path, metadata=None, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(meteora_torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        meteora_torch.write_reference(model, world["base"], out, force=True)
    assert os.listdir(out) == ["keep.txt"], "a failed write must leave the old output alone"
    with pytest.raises(OSError):
        meteora_torch.write_reference(model, world["base"], tmp_path / "new")
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)
    monkeypatch.undo()
    meteora_torch.write_reference(model, world["base"], out, force=True)
    assert sorted(os.listdir(out)) == ["adapter_order.json", "model.safetensors"]
    params = model_params(model.module)
    assert all(k[-1] in ("gate", "lora_a", "lora_b", "scale") for k in params)
