"""PEFT LoRA adapters: reading gives PEFT's exact tensors and scalings, writing round-trips through
`peft.PeftModel`, and every unsupported variant is refused with the folder, tensor and reason.

Adapters are made by PEFT itself on a tiny seeded LLaMA (odd sizes, GQA) with random lora_A and
lora_B (PEFT initialises lora_B to zero, which would hide every mistake).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import peft
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from meteora_jax.config import BLOCK_OF, PROJECTIONS, LlamaConfig, projection_shape
from meteora_jax.errors import CheckpointError, ConfigError, MeteoRAError
from meteora_jax.io import peft as peft_io
from meteora_jax.io import peft_write
from meteora_jax.io.peft import LoRAAdapter, LoRAModule, module_name, read_adapter, read_adapters
from meteora_jax.io.peft_write import write_adapter

HF_CONFIG = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)
IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
ALL = list(PROJECTIONS)

# Each case: LoraConfig arguments, the adapter name used when saving, and a rewrite of the saved folder.
CASES = {
    "plain": dict(lora=dict(r=4, lora_alpha=8, target_modules=ALL)),
    "rslora": dict(lora=dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    "patterns": dict(
        lora=dict(
            r=4,
            lora_alpha=8,
            target_modules=ALL,
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3, r"layers\.2\.self_attn\.o_proj": 5.5},
        )
    ),
    "regex": dict(
        lora=dict(r=4, lora_alpha=4, target_modules=r".*\.layers\.[02]\.(self_attn\.[qv]_proj|mlp\.up_proj)")
    ),
    "subset": dict(lora=dict(r=3, lora_alpha=6, target_modules=["v_proj", "down_proj"])),
    "layers": dict(
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2])
    ),
    "layer_int": dict(
        lora=dict(
            r=2,
            lora_alpha=8,
            target_modules=["k_proj", "gate_proj"],
            layers_to_transform=1,
            layers_pattern="layers",
        )
    ),
    "exclude": dict(
        lora=dict(
            r=2,
            lora_alpha=2,
            target_modules=["k_proj", "up_proj"],
            exclude_modules=["model.layers.1.mlp.up_proj"],
        )
    ),
    "named": dict(lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]), adapter_name="expert"),
    "default_keys": dict(
        lora=dict(r=4, lora_alpha=8, target_modules=["k_proj", "down_proj"]), rewrite="default_keys"
    ),
    "null_targets": dict(lora=dict(r=4, lora_alpha=8), rewrite="null_targets"),
    "bin": dict(lora=dict(r=4, lora_alpha=16, target_modules=["q_proj", "gate_proj"]), rewrite="bin"),
    "bf16": dict(lora=dict(r=4, lora_alpha=8, target_modules=ALL), rewrite="bf16"),
}


@dataclasses.dataclass
class Case:
    name: str
    model: peft.PeftModel  # the reference: what PEFT computes with this adapter
    folder: str
    adapter_name: str


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()


@pytest.fixture(scope="module")
def config(base) -> LlamaConfig:
    return LlamaConfig.from_hf(base.config.to_dict())


def make_peft(base, lora_config, adapter_name="default", seed=1) -> peft.PeftModel:
    """A PEFT model with seeded random LoRA weights (B too, which PEFT would start at zero)."""
    model = peft.get_peft_model(copy.deepcopy(base), lora_config, adapter_name=adapter_name).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS).logits.numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def peft_modules(model, adapter_name="default") -> dict:
    """(layer, projection) -> (A, B, scaling, alpha) of every LoRA layer in a PEFT model."""
    out = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        for p in PROJECTIONS:
            module = getattr(getattr(layer, BLOCK_OF[p]), p)
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                a = module.lora_A[adapter_name].weight.detach().numpy()
                b = module.lora_B[adapter_name].weight.detach().numpy()
                out[(i, p)] = (a, b, module.scaling[adapter_name], module.lora_alpha[adapter_name])
    return out


def edit_tensors(folder, fn) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = fn(load_file(path))
    save_file(tensors, path)


def edit_config(folder, **updates) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(updates)
    with open(path, "w") as f:
        json.dump(raw, f)


def _rewrite(kind: str, model, folder: str) -> None:
    if kind == "default_keys":  # the adapter name inserted, as some PEFT versions saved it
        edit_tensors(folder, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    elif kind == "null_targets":  # PEFT falls back to its LLaMA default, q_proj + v_proj
        edit_config(folder, target_modules=None)
    elif kind == "bin":
        path = os.path.join(folder, "adapter_model.safetensors")
        torch.save(load_file(path), os.path.join(folder, "adapter_model.bin"))
        os.remove(path)
    elif kind == "bf16":  # round the reference model too, so it is what the folder holds
        edit_tensors(folder, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(param.to(torch.bfloat16).float())


@pytest.fixture(scope="module")
def build(base, tmp_path_factory):
    """`build(case name)` -> Case, made once per module."""
    cache = {}

    def get(name: str) -> Case:
        if name not in cache:
            spec = CASES[name]
            adapter_name = spec.get("adapter_name", "default")
            model = make_peft(base, peft.LoraConfig(**spec["lora"]), adapter_name)
            root = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(root)
            folder = root if adapter_name == "default" else os.path.join(root, adapter_name)
            if "rewrite" in spec:
                _rewrite(spec["rewrite"], model, folder)
            cache[name] = Case(name, model, folder, adapter_name)
        return cache[name]

    return get


@pytest.fixture(params=sorted(CASES))
def case(request, build) -> Case:
    return build(request.param)


def copy_of(case: Case, tmp_path, name="adapter") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(case.folder, dst)
    return dst


# --- reading: exactly PEFT's tensors and scalings --------------------------------------------------


def test_read_gives_peft_tensors_and_scaling(case, config):
    adapter = read_adapter(case.folder, config)
    expected = peft_modules(case.model, case.adapter_name)
    assert set(adapter.modules) == set(expected)
    assert adapter.name == os.path.basename(case.folder)
    assert adapter.source == os.path.abspath(case.folder)
    assert adapter.use_rslora == bool(CASES[case.name]["lora"].get("use_rslora"))
    for slot, (a, b, scaling, alpha) in expected.items():
        module = adapter.modules[slot]
        assert module.a.dtype == module.b.dtype == np.float32
        np.testing.assert_array_equal(module.a, a, err_msg=str(slot))
        np.testing.assert_array_equal(module.b, b, err_msg=str(slot))
        assert module.scale == scaling and module.alpha == alpha, slot
        assert (module.a.shape[1], module.b.shape[0]) == projection_shape(config, slot[1])
    assert adapter.projections == tuple(p for p in PROJECTIONS if any(q == p for _, q in expected))
    assert adapter.max_rank == max(a.shape[0] for a, *_ in expected.values())


def test_patterns_resolve_like_peft(build, config):
    adapter = read_adapter(build("patterns").folder, config)
    assert adapter.modules[(0, "q_proj")].rank == 2 and adapter.modules[(1, "down_proj")].rank == 6
    assert adapter.modules[(0, "down_proj")].rank == 4
    assert adapter.modules[(2, "o_proj")].scale == 5.5 / 4 and adapter.modules[(1, "o_proj")].scale == 2.0
    assert adapter.modules[(0, "v_proj")].scale == 3 / 4
    rs = read_adapter(build("rslora").folder, config)
    assert all(m.scale == 16 / 8**0.5 for m in rs.modules.values())


@pytest.mark.parametrize(
    "name, slot", [("patterns", (1, "down_proj")), ("patterns", (2, "o_proj")), ("rslora", (1, "k_proj"))]
)
def test_lora_contribution_matches_peft_layer(build, config, name, slot, record_property):
    """x A^T B^T s from our module equals PEFT's layer output minus the same layer without adapter."""
    c = build(name)
    module = read_adapter(c.folder, config).modules[slot]
    layer = getattr(getattr(c.model.base_model.model.model.layers[slot[0]], BLOCK_OF[slot[1]]), slot[1])
    x = torch.randn(2, 5, projection_shape(config, slot[1])[0], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y_on = layer(x).numpy()
        with c.model.disable_adapter():
            y_off = layer(x).numpy()
    ours = (x.numpy().astype(np.float64) @ module.a.T @ module.b.T) * module.scale
    err = max_abs(y_on - y_off, ours)
    record_property(f"err:lora delta {name} {slot}", err)
    assert np.abs(ours).max() > 1e-2  # a real contribution, not zeros
    assert err <= 1e-5


# --- writing: a PEFT round trip --------------------------------------------------------------------


def test_round_trip_through_peft(case, base, config, tmp_path, record_property):
    adapter = read_adapter(case.folder, config)
    out = str(tmp_path / "out")
    write_adapter(adapter, out, base_model_name_or_path="tiny-llama", config=config)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folders left behind
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    want = logits(case.model)
    err = max_abs(logits(loaded), want)
    record_property(f"err:round trip logits {case.name}", err)
    assert err <= 1e-5
    effect = max_abs(want, logits(base))
    record_property(f"err:adapter effect on logits (must be large) {case.name}", effect)
    assert effect > 1e-3  # the adapter really changes the output
    again = read_adapter(out, config)
    assert set(again.modules) == set(adapter.modules) and again.use_rslora == adapter.use_rslora
    for slot, m in adapter.modules.items():
        np.testing.assert_array_equal(again.modules[slot].a, m.a)
        np.testing.assert_array_equal(again.modules[slot].b, m.b)
        assert again.modules[slot].scale == m.scale
    with open(os.path.join(out, "adapter_config.json")) as f:
        raw = json.load(f)
    assert raw["peft_type"] == "LORA" and raw["bias"] == "none" and raw["task_type"] == "CAUSAL_LM"
    assert raw["base_model_name_or_path"] == "tiny-llama"


def test_irregular_adapter_round_trip_through_peft(base, config, tmp_path):
    """Per-projection layer sets, per-module ranks and alphas: the generated config must express them."""
    rng = np.random.default_rng(0)

    def module(layer, p, rank, alpha):
        fan_in, fan_out = projection_shape(config, p)
        a, b = rng.normal(size=(rank, fan_in)) * 0.1, rng.normal(size=(fan_out, rank)) * 0.1
        return (layer, p), LoRAModule.from_alpha(a, b, alpha)

    adapter = LoRAAdapter(
        "irregular",
        dict(
            [
                module(0, "q_proj", 2, 4),
                module(1, "q_proj", 3, 4),
                module(2, "down_proj", 4, 6.5),
                module(1, "v_proj", 2, 4),
                module(2, "v_proj", 2, 8),
            ]
        ),
    )
    out = str(tmp_path / "irregular")
    write_adapter(adapter, out, config=config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    got = peft_modules(loaded)
    assert set(got) == set(adapter.modules)
    for slot, (a, b, scaling, _) in got.items():
        np.testing.assert_array_equal(a, adapter.modules[slot].a)
        np.testing.assert_array_equal(b, adapter.modules[slot].b)
        assert scaling == adapter.modules[slot].scale, slot


def _plain_adapter(build, config) -> LoRAAdapter:
    return read_adapter(build("plain").folder, config)


def test_write_refuses_existing_folder_and_leaves_it_alone(build, config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        write_adapter(_plain_adapter(build, config), str(out))
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]
    write_adapter(_plain_adapter(build, config), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_leaves_nothing_half_written(build, config, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_write, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_adapter(_plain_adapter(build, config), str(out), overwrite=True)
    assert os.listdir(tmp_path) == (["out"] if existing else [])
    if existing:
        assert os.listdir(out) == ["keep.txt"]


def test_write_refuses_non_finite_and_misfit_weights(build, config, tmp_path):
    adapter = _plain_adapter(build, config)
    m = adapter.modules[(1, "v_proj")]
    bad_b = m.b.copy()
    bad_b[0, 0] = np.nan
    modules = {**adapter.modules, (1, "v_proj"): LoRAModule(m.a, bad_b, m.alpha, m.scale)}
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.weight has NaN"):
        write_adapter(LoRAAdapter("bad", modules), str(tmp_path / "nan"))
    small = dataclasses.replace(config, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj .*does not fit"):
        write_adapter(adapter, str(tmp_path / "misfit"), config=small)
    assert os.listdir(tmp_path) == []


def test_adapter_validates_its_modules():
    a, b = np.ones((2, 8)), np.ones((6, 2))
    with pytest.raises(ConfigError, match="scale 5.0, but alpha 4.0 and rank 2 give 2.0"):
        LoRAAdapter("x", {(0, "q_proj"): LoRAModule(a, b, 4, 5.0)})
    with pytest.raises(ConfigError, match="not \\(layer >= 0"):
        LoRAAdapter("x", {(0, "lm_head"): LoRAModule.from_alpha(a, b, 4)})
    with pytest.raises(ConfigError, match="no LoRA modules"):
        LoRAAdapter("x", {})
    with pytest.raises(ConfigError, match="same r|one r"):
        LoRAModule(a, np.ones((6, 3)), 4, 2.0)
    assert LoRAModule.from_alpha(a, b, 4, use_rslora=True).scale == 4 / 2**0.5


# --- refusals ----------------------------------------------------------------------------------------

Q1 = "base_model.model.model.layers.1.self_attn.q_proj"


def _nan(t):
    t[f"{Q1}.lora_B.weight"] = torch.full_like(t[f"{Q1}.lora_B.weight"], float("nan"))
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"][0, 0] = float("inf")
    return t


def _drop(prefix):
    return lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "config_update, tensor_fn, error, match",
    [
        (dict(peft_type="IA3"), None, ConfigError, "peft_type 'IA3' is not supported"),
        (dict(bias="lora_only"), None, ConfigError, "bias='lora_only' trains base biases"),
        (dict(fan_in_fan_out=True), None, ConfigError, "fan_in_fan_out"),
        (dict(init_lora_weights="pissa_niter_4"), None, ConfigError, "rewrite the base weights"),
        (dict(lora_bias=True), None, ConfigError, "lora_bias"),
        (dict(r=5), None, CheckpointError, r"self_attn\.q_proj has rank 4 .*gives rank 5"),
        (dict(r=0), None, ConfigError, "r must be a positive integer"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), None, ConfigError, "regex target_modules"),
        (dict(target_modules="(unclosed"), None, ConfigError, "not a valid regular expression"),
        (dict(target_modules=["q_proj", "mlp"]), None, ConfigError, r"matches model\.layers\.0\.mlp"),
        (
            dict(target_modules=ALL[1:]),
            None,
            CheckpointError,
            r"adapt model\.layers\.0\.self_attn\.q_proj, which",
        ),
        (
            None,
            _drop(f"{Q1}."),
            CheckpointError,
            r"layers\.1\.self_attn\.q_proj \(targeted by .*\) has no lora_A / lora_B",
        ),
        (None, _drop(f"{Q1}.lora_B"), CheckpointError, r"q_proj \(targeted by .*\) has no lora_B tensor"),
        (None, _nan, CheckpointError, r"up_proj\.lora_A\.weight has NaN.*q_proj\.lora_B\.weight has NaN"),
        (
            None,
            lambda t: {**t, "extra.weight": torch.ones(2)},
            CheckpointError,
            "unexpected tensor extra.weight",
        ),
        (None, lambda t: {**t, f"{Q1}.base_layer.bias": torch.ones(2)}, CheckpointError, "a trained bias"),
        (
            None,
            lambda t: {k: v.to(torch.int32) for k, v in t.items()},
            CheckpointError,
            "dtype int32, expected a float",
        ),
        (
            None,
            lambda t: {**t, f"{Q1}.lora_A.other.weight": t[f"{Q1}.lora_A.weight"].clone()},
            CheckpointError,
            "both hold lora_A",
        ),
        (None, lambda t: {}, CheckpointError, r"holds no tensors \(an empty adapter\)"),
    ],
)
def test_refuses_bad_adapter(build, config, tmp_path, config_update, tensor_fn, error, match):
    folder = copy_of(build("plain"), tmp_path)
    if config_update:
        edit_config(folder, **config_update)
    if tensor_fn:
        edit_tensors(folder, tensor_fn)
    with pytest.raises(error, match=re.escape(folder) + ".*" + match):
        read_adapter(folder, config)


@pytest.mark.parametrize(
    "lora, fix_config, error, match",
    [
        (dict(use_dora=True), None, ConfigError, r"DoRA \(use_dora=true\)"),
        (
            dict(use_dora=True),
            dict(use_dora=False),
            CheckpointError,
            "lora_magnitude_vector is a DoRA magnitude vector",
        ),
        (dict(modules_to_save=["lm_head"]), None, ConfigError, "modules_to_save=\\['lm_head'\\]"),
        (
            dict(modules_to_save=["lm_head"]),
            dict(modules_to_save=None),
            CheckpointError,
            r"lm_head\.weight is a base weight \(modules_to_save",
        ),
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            None,
            ConfigError,
            r"embed_tokens \(embedding / lm_head LoRA",
        ),
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            dict(target_modules=["q_proj"]),
            CheckpointError,
            "embedding LoRA",
        ),
        (
            dict(target_modules=["q_proj", "lm_head"]),
            None,
            ConfigError,
            r"matches lm_head \(embedding / lm_head LoRA",
        ),
        (
            dict(target_modules=["q_proj", "lm_head"]),
            dict(target_modules=["q_proj"]),
            CheckpointError,
            "lm_head.lora_A.weight is LoRA on",
        ),
    ],
)
def test_refuses_unsupported_peft_variants(base, config, tmp_path, lora, fix_config, error, match):
    """Made by PEFT itself; with the config 'fixed', the tensors alone must still give it away."""
    model = make_peft(base, peft.LoraConfig(r=2, lora_alpha=4, **{"target_modules": ["q_proj"], **lora}))
    folder = str(tmp_path / "variant")
    model.save_pretrained(folder)
    if fix_config:
        edit_config(folder, **fix_config)
    with pytest.raises(error, match=re.escape(folder) + ".*" + match):
        read_adapter(folder, config)


def test_refuses_adapter_for_another_model(build, config):
    folder = build("plain").folder
    with pytest.raises(
        CheckpointError, match=r"gate_proj\.lora_B\.weight has shape \(80, 4\), expected \(96, 4\)"
    ):
        read_adapter(folder, dataclasses.replace(config, intermediate_size=96))
    with pytest.raises(
        CheckpointError, match=r"layers\.2\..* is for layer 2, but the base model has 2 layers"
    ):
        read_adapter(folder, dataclasses.replace(config, num_hidden_layers=2))


def test_refuses_folders_that_are_not_adapters(config, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        read_adapter(tmp_path / "missing", config)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(
        ConfigError, match=r"model is not a PEFT adapter folder: no adapter_config.json \(it looks"
    ):
        read_adapter(tmp_path / "model", config)
    (tmp_path / "model" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json: not valid JSON"):
        read_adapter(tmp_path / "model", config)
    (tmp_path / "model" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        read_adapter(tmp_path / "model", config)


def test_bin_needs_torch_and_refuses_arbitrary_pickles(build, config, tmp_path, monkeypatch):
    folder = copy_of(build("bin"), tmp_path)
    path = os.path.join(folder, "adapter_model.bin")
    torch.save({"x": torch.ones(2), "evil": _Evil()}, path)
    with pytest.raises(
        CheckpointError, match=re.escape(path) + ".*cannot be loaded as a plain tensor state dict"
    ):
        read_adapter(folder, config)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="legacy .bin adapters need torch"):
        read_adapter(folder, config)


class _Evil:
    pass


def test_safetensors_preferred_over_bin(build, config, tmp_path):
    folder = copy_of(build("plain"), tmp_path)
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"not a pickle")
    assert set(read_adapter(folder, config).modules) == set(peft_modules(build("plain").model))


def test_read_adapters_order_names_and_duplicates(build, config, tmp_path):
    folders = [build(n).folder for n in ("subset", "plain", "layers")]
    adapters = read_adapters(folders, config)
    assert [a.name for a in adapters] == [os.path.basename(f) for f in folders]
    named = read_adapters({"b": folders[0], "a": folders[1]}, config)
    assert [a.name for a in named] == ["b", "a"] and named[0].modules.keys() == adapters[0].modules.keys()
    twin = tmp_path / "x" / os.path.basename(folders[1])
    shutil.copytree(folders[1], twin)
    with pytest.raises(ConfigError, match=f"duplicate adapter names: '{os.path.basename(folders[1])}'"):
        read_adapters([folders[1], str(twin)], config)
    broken = copy_of(build("plain"), tmp_path, "broken")
    edit_config(broken, use_dora=True)
    with pytest.raises(MeteoRAError, match=r"2 of 3 adapters cannot be read:(.|\n)*broken(.|\n)*missing"):
        read_adapters([folders[0], broken, str(tmp_path / "missing")], config)


# --- properties ----------------------------------------------------------------------------------------

NAMES = [name for name, _ in peft_io._llama_modules(3)]
TARGET_WORDS = [
    "q_proj",
    "v_proj",
    "down_proj",
    "mlp",
    "self_attn.o_proj",
    "model.layers.1.mlp.up_proj",
    "lm_head",
]


@settings(max_examples=80, deadline=None)
@given(
    targets=st.one_of(
        st.lists(st.sampled_from(TARGET_WORDS), min_size=1, max_size=4, unique=True),
        st.sampled_from([r".*\.1\..*_proj", r"model\.layers\.[02]\.mlp\..*", r".*(q|k)_proj"]),
    ),
    layers=st.one_of(st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3, unique=True)),
    pattern=st.sampled_from([None, "layers", ["foo", "layers"], "model", "", [], [""]]),
    exclude=st.sampled_from([None, ["q_proj"], ["model.layers.2.mlp.down_proj"], r".*\.0\..*"]),
    rank_keys=st.lists(
        st.sampled_from(["q_proj", "proj", r"layers\.1\..*", "model.layers.2.mlp.down_proj", "mlp.*"]),
        max_size=3,
        unique=True,
    ),
)
def test_targeting_and_patterns_match_peft(targets, layers, pattern, exclude, rank_keys):
    """Our re-implementation against PEFT's own `check_target_module_exists` and `get_pattern_key`;
    configs LoraConfig refuses (regex targets with layers, a pattern without layers) we refuse too."""
    lora = dict(
        target_modules=targets,
        exclude_modules=exclude,
        rank_pattern={k: i + 2 for i, k in enumerate(rank_keys)},
        layers_to_transform=layers,
        layers_pattern=pattern,
    )
    try:
        theirs = peft.LoraConfig(**lora)
    except ValueError:
        with pytest.raises(ConfigError, match="layers_"):
            peft_io._parse_settings({"peft_type": "LORA", **lora}, where="test")
        return
    ours = peft_io._parse_settings({"peft_type": "LORA", **lora}, where="test")
    for name in NAMES:
        assert peft_io._is_targeted(ours, name) == bool(check_target_module_exists(theirs, name)), name
        key = get_pattern_key(theirs.rank_pattern.keys(), name)
        assert peft_io._pattern_value(ours.rank_pattern, name, 8) == theirs.rank_pattern.get(key, 8), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_write_then_read_is_identity(config, data):
    """Random module sets, ranks and alphas survive write_adapter + read_adapter exactly."""
    slots = data.draw(
        st.sets(st.tuples(st.integers(0, 2), st.sampled_from(PROJECTIONS)), min_size=1, max_size=10)
    )
    use_rslora = data.draw(st.booleans())
    with_config = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    modules = {}
    for layer, p in sorted(slots):
        rank, alpha = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1, 4, 8, 2.5]))
        fan_in, fan_out = projection_shape(config, p)
        a, b = rng.normal(size=(rank, fan_in)), rng.normal(size=(fan_out, rank))
        modules[(layer, p)] = LoRAModule.from_alpha(a, b, alpha, use_rslora)
    adapter = LoRAAdapter("prop", modules, use_rslora=use_rslora)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(adapter, os.path.join(tmp, "prop"), config=config if with_config else None)
        again = read_adapter(os.path.join(tmp, "prop"), config)
    assert again.modules.keys() == adapter.modules.keys()
    for slot, m in adapter.modules.items():
        got = again.modules[slot]
        assert (got.rank, got.alpha, got.scale) == (m.rank, m.alpha, m.scale), slot
        np.testing.assert_array_equal(got.a, m.a)
        np.testing.assert_array_equal(got.b, m.b)


def test_module_name_is_peft_module_path(base):
    names = {n for n, _ in base.named_modules()}
    assert {module_name(i, p) for i in range(3) for p in PROJECTIONS} <= names
    assert set(NAMES) == names - {""}
