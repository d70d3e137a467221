"""`meteora-jax convert` and `meteora-jax export`: checkpoints in, PEFT folders and the MeteoRA
reference format out, all atomic, with user errors as exit code 2 and a one-line message.
"""

from __future__ import annotations

import json
import os

import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from conftest import make_hf_model, make_peft_adapter, max_abs, torch_logits

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.io import checkpoint

TOL = 1e-4
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "beta": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _, base = make_hf_model(root / "base")
    dirs = {
        n: make_peft_adapter(base, root / f"{n}-dir", seed=i + 3, **kw)
        for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    specs = [f"{n}={d}" for n, d in dirs.items()]
    assert (
        main(
            [
                "convert",
                "--base",
                base,
                *sum((["--adapter", s] for s in specs), []),
                "--out",
                str(root / "ckpt"),
            ]
        )
        == 0
    )
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(base, adapters=dirs)  # the same seeded gates (seed 0) as convert
    return dict(root=root, base=base, dirs=dirs, specs=specs, ckpt=str(root / "ckpt"), model=model)


def ids_of(seed, batch=2, length=31, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def no_leftovers(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_equals_load_model(world, capsys, record_error):
    loaded = mj.load_model(world["base"], gates=world["ckpt"])
    ids = ids_of(1)
    err = record_error(
        "CLI convert -> load_model(gates=CKPT)", max_abs(loaded(ids).logits, world["model"](ids).logits)
    )
    assert err == 0
    again = mj.load_model(world["base"], adapters=world["dirs"], gates=world["ckpt"])
    assert max_abs(again(ids).logits, world["model"](ids).logits) == 0


def test_convert_warns_on_untrained_gates_and_stores_routing(world, tmp_path, capsys):
    out = tmp_path / "k1"
    code, printed, err = run(
        capsys,
        "convert",
        "--base",
        world["base"],
        "--adapter",
        world["specs"][0],
        "--adapter",
        world["specs"][1],
        "--top-k",
        1,
        "--temperature",
        2.5,
        "--out",
        out,
    )
    assert code == 0 and "untrained" in err and f"wrote {out}" in printed
    assert (checkpoint.read_meta(out)[1].top_k, checkpoint.read_meta(out)[1].temperature) == (1, 2.5)


def test_convert_with_reference_gates(world, tmp_path, capsys, record_error):
    code, _, _ = run(
        capsys, "export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out", tmp_path / "ref"
    )
    assert code == 0
    gates_file = tmp_path / "ref" / "model.safetensors"
    code, _, err = run(
        capsys,
        "convert",
        "--base",
        world["base"],
        "--adapter",
        world["specs"][0],
        "--adapter",
        world["specs"][1],
        "--gates",
        gates_file,
        "--out",
        tmp_path / "from-ref",
    )
    assert code == 0 and "untrained" not in err
    ids = ids_of(2)
    got = mj.load_model(world["base"], gates=tmp_path / "from-ref")(ids).logits
    err = record_error(
        "export meteora-torch -> convert --gates FILE", max_abs(got, world["model"](ids).logits)
    )
    assert err == 0


def test_export_meteora_torch(world, tmp_path, capsys, record_error):
    out = tmp_path / "reference"
    code, printed, _ = run(capsys, "export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out", out)
    assert code == 0 and "adapter order: alpha, beta" in printed
    order = json.loads((out / "adapter_order.json").read_text())
    assert order["adapter_order"] == ["alpha", "beta"] and order["padded"] and order["rank"] == 4
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    assert "base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight" in tensors
    model = mj.load_model(world["base"], adapters=world["dirs"], gates=out / "model.safetensors")
    ids = ids_of(3)
    err = record_error(
        "export meteora-torch -> load_model", max_abs(model(ids).logits, world["model"](ids).logits)
    )
    assert err <= TOL


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_export_peft_equals_peft_model(world, tmp_path_factory, capsys, name, record_error):
    out = tmp_path_factory.getbasetemp() / "peft-export"
    if not out.exists():
        code, printed, _ = run(capsys, "export", "--ckpt", world["ckpt"], "--to", "peft", "--out", out)
        assert code == 0 and "wrote 2 PEFT adapters" in printed
    assert sorted(os.listdir(out)) == ["alpha", "beta"]
    original = safetensors.torch.load_file(os.path.join(world["dirs"][name], "adapter_model.safetensors"))
    exported = safetensors.torch.load_file(out / name / "adapter_model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)

    base = transformers.LlamaForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, out / name).eval()
    with pytest.warns(UserWarning, match="untrained"):  # one adapter at top-1: its gate cannot matter
        ours = mj.load_model(world["base"], adapters={name: world["dirs"][name]}, top_k=1)
    ids = ids_of(4)
    want = torch_logits(reference, ids)
    err = record_error(
        f"export peft {name} -> PeftModel vs ours (alone, k=1)", max_abs(ours(ids).logits, want)
    )
    assert err <= TOL
    with reference.disable_adapter():
        assert max_abs(torch_logits(reference, ids), want) > 100 * TOL, "the adapter must change the output"


# ----------------------------------------------------------------------------- refusals


def test_export_refuses_a_different_base(world, tmp_path, capsys):
    _, other = make_hf_model(tmp_path / "other", seed=6)
    out = tmp_path / "ref"
    code, _, err = run(
        capsys, "export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out", out, "--base", other
    )
    assert code == 2 and err.startswith("meteora-jax export: error: ") and err.count("\n") == 1
    assert other in err and world["base"] in err and "fingerprint" in err
    assert not out.exists() and no_leftovers(tmp_path)


def test_existing_outputs_need_force(world, tmp_path, capsys):
    for argv in (
        ["convert", "--base", world["base"], "--adapter", world["specs"][0], "--top-k", 1, "--out"],
        ["export", "--ckpt", world["ckpt"], "--to", "peft", "--out"],
        ["export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out"],
    ):
        out = tmp_path / "taken"
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("mine")
        code, _, err = run(capsys, *argv, out)
        assert code == 2 and "already exists" in err and str(out) in err
        assert os.listdir(out) == ["keep.txt"] and no_leftovers(tmp_path)
        code, _, _ = run(capsys, *argv, out, "--force")
        assert code == 0 and "keep.txt" not in os.listdir(out)
        os.rename(out, tmp_path / f"done-{argv[0]}-{len(os.listdir(tmp_path))}")


def test_user_errors_exit_2_with_one_line(world, tmp_path, capsys):
    cases = [
        (
            ["convert", "--base", world["base"], "--adapter", tmp_path / "nope", "--out", tmp_path / "c"],
            "nope",
        ),
        (
            [
                "convert",
                "--base",
                world["base"],
                "--adapter",
                f"x={world['dirs']['alpha']}",
                "--adapter",
                f"x={world['dirs']['beta']}",
                "--out",
                tmp_path / "c",
            ],
            "two adapters are named 'x'",
        ),
        (
            ["export", "--ckpt", tmp_path / "missing", "--to", "peft", "--out", tmp_path / "e"],
            "does not exist",
        ),
        (
            [
                "convert",
                "--base",
                world["base"],
                "--adapter",
                world["specs"][0],
                "--gates",
                world["ckpt"],
                "--out",
                tmp_path / "c",
            ],
            "omit adapters=",
        ),
    ]
    for argv, expected in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()
    assert main(["export", "--ckpt", world["ckpt"], "--to", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "meteora-jax export: error: argument --to: invalid choice: 'onnx'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # --help prints the help and exits 0
        main(["--help"])
    assert "convert" in capsys.readouterr().out
