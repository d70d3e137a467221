"""Output-path safety (`meteora_jax.io.files.check_output_path`): no command or writer may replace
the current folder, the home folder, the root, or any of its own inputs, with or without --force.

Every test runs sandboxed (`sandbox`): the current folder and HOME are fresh folders under
tmp_path, and renaming, deleting or creating a folder anywhere outside pytest's temporary area
raises, so even a broken check could not touch a real folder (these tests run as root on some
machines, where `--out /` would otherwise be reachable).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil

import pytest
from conftest import make_hf_model, make_peft_adapter

from meteora_jax.cli import main
from meteora_jax.errors import MeteoRAError, OutputPathError
from meteora_jax.io import files

ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "beta": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
}


def _inside(path, root: str) -> bool:
    real = os.path.realpath(os.fspath(path))
    return os.path.commonpath([real, root]) == root


def _guarded(fn, allowed: str):
    """`fn` refusing any path argument outside `allowed` (calls relative to a dir_fd are the
    insides of an already checked call, such as rmtree walking its folder)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if kwargs.get("dir_fd") is None and kwargs.get("src_dir_fd") is None:
            for arg in args[:2]:
                if isinstance(arg, str | bytes | os.PathLike) and not _inside(os.fsdecode(arg), allowed):
                    raise AssertionError(f"sandbox: {fn.__name__}({arg!r}) outside {allowed}")
        return fn(*args, **kwargs)

    return call


@pytest.fixture(autouse=True)
def sandbox(tmp_path, tmp_path_factory, monkeypatch):
    """cwd = tmp_path/cwd, HOME = tmp_path/home (each holding a file to keep), and no folder outside
    pytest's temporary area can be renamed, removed or created while the test runs."""
    allowed = os.path.realpath(tmp_path_factory.getbasetemp())
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    for folder in (cwd, home):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for module, name in (
        (os, "replace"),
        (os, "rename"),
        (os, "rmdir"),
        (os, "remove"),
        (os, "unlink"),
        (os, "mkdir"),
        (shutil, "rmtree"),
        (shutil, "move"),
    ):
        monkeypatch.setattr(module, name, _guarded(getattr(module, name), allowed))
    assert _inside(os.getcwd(), allowed) and _inside(os.path.expanduser("~"), allowed)
    return dict(cwd=cwd, home=home)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, two adapters and a checkpoint of them (built by `convert`)."""
    root = tmp_path_factory.mktemp("paths")
    _, base = make_hf_model(root / "base")
    dirs = {
        n: make_peft_adapter(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    specs = [a for n, d in dirs.items() for a in ("--adapter", f"{n}={d}")]
    ckpt = str(root / "ckpt")
    assert main(["convert", "--base", base, *specs, "--top-k", "1", "--out", ckpt]) == 0
    return dict(root=str(root), base=base, dirs=dirs, specs=specs, ckpt=ckpt)


def snapshot(*folders) -> dict[str, str]:
    """Every file (by path) with its sha256, and every folder, under `folders`."""
    found = {}
    for folder in folders:
        for parent, dirnames, filenames in os.walk(folder):
            for d in dirnames:
                found[os.path.join(parent, d)] = "<dir>"
            for f in filenames:
                path = os.path.join(parent, f)
                with open(path, "rb") as fh:
                    found[path] = hashlib.sha256(fh.read()).hexdigest()
    return found


def refused(capsys, sandbox, world, argv, *expected) -> str:
    """Runs the command; asserts exit 2 with one line holding `expected`, and nothing changed."""
    before = snapshot(world["root"], sandbox["cwd"], sandbox["home"])
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"meteora-jax {argv[0]}: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert str(text) in err, err
    assert snapshot(world["root"], sandbox["cwd"], sandbox["home"]) == before
    return err


def convert(world, out, *extra):
    return ["convert", "--base", world["base"], *world["specs"], "--out", out, *extra]


# ----------------------------------------------------------------------------- the data-loss cases


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_convert_refuses_an_empty_out(capsys, sandbox, world, force):
    refused(capsys, sandbox, world, convert(world, "", *force), "--out is empty")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_convert_refuses_the_current_folder(capsys, sandbox, world, force):
    refused(capsys, sandbox, world, convert(world, ".", *force), "--out .", "is the current folder")


def test_an_ancestor_of_the_current_folder_is_refused(capsys, sandbox, world, monkeypatch):
    deep = sandbox["cwd"] / "deep"
    deep.mkdir()
    monkeypatch.chdir(deep)
    refused(
        capsys, sandbox, world, convert(world, "..", "--force"), "--out ..", "contains the current folder"
    )


def test_convert_refuses_its_own_base(capsys, sandbox, world):
    refused(capsys, sandbox, world, convert(world, world["base"], "--force"), "is --base", world["base"])


def test_convert_refuses_an_adapter_and_the_gates(capsys, sandbox, world):
    alpha = world["dirs"]["alpha"]
    refused(capsys, sandbox, world, convert(world, alpha, "--force"), "is --adapter", alpha)
    argv = convert(world, world["ckpt"], "--force", "--gates", world["ckpt"])
    refused(capsys, sandbox, world, argv, "is --gates", world["ckpt"])


def test_export_refuses_its_own_checkpoint(capsys, sandbox, world):
    for to in ("peft", "meteora-torch"):
        argv = ["export", "--ckpt", world["ckpt"], "--to", to, "--out", world["ckpt"], "--force"]
        refused(capsys, sandbox, world, argv, "--out", "is --ckpt", world["ckpt"])


def test_export_meteora_torch_refuses_the_base(capsys, sandbox, world):
    """The base recorded in the checkpoint is refused too, not only a --base given on the line."""
    argv = ["export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out", world["base"], "--force"]
    refused(capsys, sandbox, world, argv, "is the base recorded in --ckpt", world["base"])
    refused(capsys, sandbox, world, [*argv, "--base", world["base"]], "is --base")
    argv[4] = "peft"  # a PEFT export does not read the base, but must not replace it either
    refused(capsys, sandbox, world, argv, "is the base recorded in")


def test_an_out_inside_an_input_is_refused(capsys, sandbox, world):
    inside = os.path.join(world["base"], "ckpt")
    refused(capsys, sandbox, world, convert(world, inside, "--force"), "is inside --base", world["base"])
    argv = ["export", "--ckpt", world["ckpt"], "--to", "peft", "--out", os.path.join(world["ckpt"], "x")]
    refused(capsys, sandbox, world, argv, "is inside --ckpt")


def test_an_out_containing_an_input_is_refused(capsys, sandbox, world):
    refused(
        capsys, sandbox, world, convert(world, world["root"], "--force"), "contains --base", world["base"]
    )


def test_a_link_to_an_input_is_refused(capsys, sandbox, world):
    link = sandbox["cwd"] / "link"
    link.symlink_to(world["base"], target_is_directory=True)
    refused(capsys, sandbox, world, convert(world, link, "--force"), "is --base", world["base"])
    assert os.path.islink(link)


def test_the_home_folder_is_refused(capsys, sandbox, world):
    home = sandbox["home"]
    refused(capsys, sandbox, world, convert(world, home, "--force"), "is the home folder", home)
    argv = ["export", "--ckpt", world["ckpt"], "--to", "peft", "--out", home, "--force"]
    refused(capsys, sandbox, world, argv, "is the home folder")


def test_the_root_is_refused(capsys, sandbox, world):
    refused(
        capsys, sandbox, world, convert(world, os.sep, "--force"), f"--out {os.sep}", "the filesystem root"
    )
    argv = ["export", "--ckpt", world["ckpt"], "--to", "meteora-torch", "--out", os.sep, "--force"]
    refused(capsys, sandbox, world, argv, "the filesystem root")


def test_generate_outputs_are_checked_before_loading(capsys, sandbox, world):
    prompts = sandbox["cwd"] / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    base = ["generate", "--base", world["base"], *world["specs"]]
    config = os.path.join(world["base"], "config.json")
    argv = [*base, "--prompt", "hi", "--routing-html", config]
    refused(capsys, sandbox, world, argv, "--routing-html", "is inside --base")
    argv = [*base, "--prompt", "hi", "--routing-json", world["dirs"]["beta"]]
    refused(capsys, sandbox, world, argv, "--routing-json", "is --adapter")
    argv = [*base, "--prompts", prompts, "--out", prompts]
    refused(capsys, sandbox, world, argv, "--out", "is --prompts")
    argv = ["generate", "--ckpt", world["ckpt"], "--prompt", "hi", "--routing-png", "."]
    refused(capsys, sandbox, world, argv, "--routing-png .", "is the current folder")
    argv = ["generate", "--ckpt", world["ckpt"], "--prompt", "hi", "--routing-png", config]
    refused(capsys, sandbox, world, argv, "is inside the base recorded in --ckpt")


def test_bench_json_is_checked_before_timing(capsys, sandbox, world):
    argv = ["bench", "layer", "--no-torch", "--base", world["base"], "--json", world["base"]]
    refused(capsys, sandbox, world, argv, "--json", "is --base")
    refused(capsys, sandbox, world, ["bench", "model", "--json", ""], "--json is empty")


def test_demo_out_is_checked(capsys, sandbox, world):
    refused(capsys, sandbox, world, ["demo", "--out", ".", "--force"], "--out .", "is the current folder")
    refused(capsys, sandbox, world, ["demo", "--out", sandbox["home"], "--force"], "is the home folder")


# ----------------------------------------------------------------------------- the writers


def test_every_writer_refuses_the_protected_folders(sandbox):
    """refuse_existing, staged_directory and atomic_file check the path themselves, so every
    save_* built on them is covered without a check of its own."""
    cases = [("", "is empty"), (".", "is the current folder"), (os.sep, "the filesystem root")]
    cases += [
        (str(sandbox["home"]), "is the home folder"),
        (str(sandbox["cwd"].parent), "contains the current"),
    ]
    before = snapshot(sandbox["cwd"], sandbox["home"])
    for path, message in cases:
        with pytest.raises(OutputPathError, match=f"output path.*{message}"):
            files.refuse_existing(path, force=True)
        with pytest.raises(OutputPathError, match=message), files.staged_directory(path, force=True):
            raise AssertionError("not reached: refused on entry")
        with pytest.raises(OutputPathError, match=message), files.atomic_file(path):
            raise AssertionError("not reached: refused on entry")
    assert snapshot(sandbox["cwd"], sandbox["home"]) == before


def test_save_llama_refuses_the_current_folder(sandbox):
    from flax import nnx

    from meteora_jax.config import LlamaConfig
    from meteora_jax.io.hf import save_llama
    from meteora_jax.modeling.llama import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=31, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    with pytest.raises(MeteoRAError, match="is the current folder"):
        save_llama(model, ".", overwrite=True)
    assert os.listdir(sandbox["cwd"]) == ["keep.txt"]


def test_check_output_path_allows_ordinary_outputs(sandbox, world):
    inputs = [("--base", world["base"]), ("--ckpt", None)]
    for path in ("out", "./out", sandbox["cwd"] / "a" / "b", os.path.join(world["root"], "base-copy")):
        files.check_output_path(path, inputs=inputs)
    files.check_output_path(sandbox["home"] / "work" / "ckpt")  # inside home is fine


def test_the_message_names_the_setting_and_both_paths(sandbox, world):
    with pytest.raises(OutputPathError) as caught:
        files.check_output_path(
            os.path.join(world["base"], "..", "base"),
            inputs=[("--tokenizer", world["base"])],
            setting="--out",
        )
    message = str(caught.value)
    assert message.startswith("--out ") and "is --tokenizer" in message and world["base"] in message
    assert "\n" not in message and isinstance(caught.value, MeteoRAError)
