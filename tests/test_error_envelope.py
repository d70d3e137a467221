"""One error envelope: every error a user can cause is a `MeteoRAError` naming the file or setting
at fault; the command line prints it as one line and exits 2, never with a traceback.

Each case here was found failing otherwise (a traceback, a ZeroDivisionError, a raw slice error,
a misleading message, or a name accepted and refused only later).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, make_peft_adapter

import meteora_jax as mj
from meteora_jax.cli import main
from meteora_jax.commands import adapter_specs, run_reporting
from meteora_jax.data import prompts
from meteora_jax.errors import ConfigError, MeteoRAError, MissingFileError, OutputExistsError
from meteora_jax.generation import generate
from meteora_jax.inputs import device_memory_limit, validate_adapter_name
from meteora_jax.io import files

TEXTS = ["[INST] add 2 and 3 [/INST]\n 5", "the cat sat on the mat", "good morning, how are you?"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base with a tokenizer, one adapter, and the base model loaded."""
    root = tmp_path_factory.mktemp("envelope")
    _, base = make_hf_model(root / "base")
    prompts.train_tiny_tokenizer(TEXTS * 8, base, vocab_size=120)
    adapter = make_peft_adapter(base, root / "alpha", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"])
    return dict(root=root, base=base, adapter=adapter, model=mj.load_model(base))


def one_line_error(capsys, argv, *expected) -> str:
    """Runs the CLI; asserts exit 2 and a single stderr line holding every `expected` text."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"meteora-jax {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert str(text) in err, err
    return err


# ----------------------------------------------------------------------------- the command line


def test_no_repeat_ngram_size_beyond_the_sequence(capsys, world):
    argv = ["generate", "--base", world["base"], "--prompt", "hi", "--max-new-tokens", 4]
    one_line_error(
        capsys, [*argv, "--no-repeat-ngram-size", 1000000], "no_repeat_ngram_size=1000000", "sequence length"
    )
    ids = np.ones((1, 5), np.int32)
    with pytest.raises(
        ConfigError, match=r"no_repeat_ngram_size=10 is beyond the sequence length 9 \(prompt 5"
    ):
        generate(world["model"], ids, max_new_tokens=4, no_repeat_ngram_size=10)


def test_ckpt_pointing_at_a_file(capsys, world, tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a checkpoint")
    for argv in (
        ["export", "--ckpt", file, "--to", "peft", "--out", tmp_path / "out"],
        ["generate", "--ckpt", file, "--prompt", "hi"],
        ["generate", "--ckpt", file, "--base", world["base"], "--prompt", "hi"],
    ):
        one_line_error(capsys, argv, f"--ckpt {file} is a file, not a checkpoint folder")
    one_line_error(
        capsys, ["generate", "--ckpt", tmp_path / "nope", "--prompt", "hi"], "--ckpt", "does not exist"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["..", ".", "a" * 300, "with space", "a/b", ""])
def test_bad_adapter_names_are_refused_by_convert(capsys, world, tmp_path, name):
    out = tmp_path / "ckpt"
    argv = ["convert", "--base", world["base"], "--adapter", f"{name}={world['adapter']}", "--out", out]
    if "/" in name or name == "":  # not a NAME=: the whole spec is a folder, which does not exist
        one_line_error(capsys, argv, "does not exist")
    else:
        err = one_line_error(capsys, argv, "--adapter", "adapter name", "is not allowed")
        assert ("300 characters" in err) == (len(name) == 300) and len(err) < 400
    assert not out.exists()


def test_bad_adapter_names_are_refused_by_load_model(world, tmp_path):
    for name in ("..", "a" * 101, "tab\there"):
        with pytest.raises(ConfigError, match="adapter name .* is not allowed"):
            mj.load_model(world["base"], adapters={name: world["adapter"]})
    spaced = tmp_path / "my adapter"
    shutil.copytree(world["adapter"], spaced)
    with pytest.raises(ConfigError, match=f"adapters= \\({spaced}\\): adapter name 'my adapter'"):
        mj.load_model(world["base"], adapters=[spaced])
    with pytest.warns(UserWarning, match="untrained"):
        mj.load_model(world["base"], adapters={"a" * 100: world["adapter"], "v1.2_x-y": world["adapter"]})


def test_the_name_rule():
    for good in ("a", "A-1", "math_v2.0", ".hidden", "..x", "a" * 100):
        assert validate_adapter_name(good, "test") == good
    for bad in (".", "..", "", "a" * 101, "a b", "é", "a/b", "a\\b", "a=b", None, 3):
        with pytest.raises(ConfigError, match="^test: "):
            validate_adapter_name(bad, "test")


def test_missing_inputs_are_one_line(capsys, world, tmp_path):
    one_line_error(
        capsys, ["generate", "--base", world["base"], "--prompts", tmp_path / "no.jsonl"], "--prompts"
    )
    argv = ["convert", "--base", tmp_path / "nobase", "--adapter", world["adapter"], "--out", tmp_path / "c"]
    one_line_error(capsys, argv, "nobase")


def test_prompt_files_the_codecs_reject_are_one_line(capsys, world, tmp_path):
    """generate --prompts: a byte that is not UTF-8, or a lone surrogate, names the file and line."""
    for name, data, says in (
        ("bytes.jsonl", b'{"prompt": "a"}\n{"prompt": "\xc3("}\n', "line 2: not UTF-8 text (byte 0xc3"),
        ("surrogate.jsonl", b'{"prompt": "\\udfff"}\n', "line 1: a string holds a lone surrogate"),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        one_line_error(capsys, ["generate", "--base", world["base"], "--prompts", path], f"{path} {says}")


def test_text_the_codecs_reject_from_the_command_line_or_the_api_is_one_line(capsys, world, tmp_path):
    """A --prompt holding a byte that is not UTF-8 (Python keeps it as a surrogate escape), a
    checkpoint path holding one, and a lone surrogate given to the Python API: each names where it
    came from, instead of a tokenizer TypeError or an Orbax traceback."""
    generate = ["generate", "--base", world["base"], "--prompt", "add 2 and \udcff"]
    one_line_error(capsys, generate, "--prompt: holds byte 0xff, which is not UTF-8 text (character 11)")
    out = tmp_path / "ck\udcff"
    convert = ["convert", "--base", world["base"], "--adapter", world["adapter"], "--out", out]
    one_line_error(capsys, convert, "only under UTF-8 paths")
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"a prompt: a string holds a lone surrogate \('\\ud800'\)"):
        prompts.encode_prompts(prompts.load_tokenizer(world["base"]), ["a \ud800"])


def test_a_full_disk_under_convert_is_one_line_naming_out(capsys, world, tmp_path, monkeypatch):
    """Orbax reports a full disk as tensorstore's status text inside a ValueError, naming its own
    temporary files: convert says it in one line naming --out, and leaves nothing behind."""
    import orbax.checkpoint as ocp

    def full(self, step, *args, **kwargs):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Failed writing: "{self.directory}/0.orbax-checkpoint-tmp/d/1a2b": '
            "Failed to write 24878 bytes to file 7: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    out = tmp_path / "ck"
    convert = ["convert", "--base", world["base"], "--adapter", world["adapter"], "--out", out]
    capsys.readouterr()
    assert main([str(a) for a in convert]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"meteora-jax convert: error: {out}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_sigterm_removes_a_half_written_output_and_is_one_line(capsys, tmp_path):
    """A command stopped by SIGTERM while writing its output (a scheduler's kill): one line, exit
    143, and no hidden temporary folder left beside --out."""
    import signal

    def writes_then_killed(_):
        with files.staged_directory(tmp_path / "out") as tmp:
            (pathlib.Path(tmp) / "half.json").write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives at once; never reached

    args = argparse.Namespace(command="eval", func=writes_then_killed)
    assert run_reporting(args) == 143
    assert capsys.readouterr().err == "meteora-jax eval: stopped by SIGTERM\n"
    assert os.listdir(tmp_path) == []


def test_os_errors_from_below_are_one_line_too(capsys):
    def denied(_):
        raise PermissionError(13, "Permission denied", "/somewhere/out.json")

    args = argparse.Namespace(command="bench", func=denied)
    assert run_reporting(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/somewhere/out.json" in err


# ----------------------------------------------------------------------------- the Python API


def test_file_errors_are_meteora_errors(world, tmp_path):
    """The project's own missing / existing file errors are MeteoRAErrors and still the builtins."""
    for call in (
        lambda: mj.load_model(tmp_path / "missing"),
        lambda: mj.load_model(world["base"], adapters=[tmp_path / "missing"]),
        lambda: mj.load_model(world["base"], adapters=[world["adapter"]], gates=tmp_path / "missing"),
    ):
        with pytest.raises(MissingFileError, match="missing") as caught:
            call()
        assert isinstance(caught.value, MeteoRAError) and isinstance(caught.value, FileNotFoundError)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists") as caught:
        files.refuse_existing(taken)
    assert isinstance(caught.value, MeteoRAError) and isinstance(caught.value, FileExistsError)


@pytest.mark.parametrize("shape", [(1, 0), (0, 4), (0,)])
def test_empty_input_ids(world, shape):
    ids = np.zeros(shape, np.int32)
    with pytest.raises(MeteoRAError, match="input_ids must be a non-empty"):
        world["model"](ids)
    with pytest.raises(MeteoRAError, match="input_ids must be a non-empty"):
        generate(world["model"], ids, max_new_tokens=2)
    with pytest.raises(MeteoRAError, match="input_ids must be a non-empty"):
        generate(world["model"], [], max_new_tokens=2)


def test_init_cache_with_negative_sizes(world):
    with pytest.raises(MeteoRAError, match="init_cache: batch must be a positive integer, got -1"):
        world["model"].init_cache(-1, -5)
    with pytest.raises(MeteoRAError, match="init_cache: max_length must be a positive integer, got -5"):
        world["model"].init_cache(1, -5)


def test_an_all_padding_mask(world):
    ids, mask = np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(MeteoRAError, match="attention_mask row 1 has no real token"):
        world["model"](ids, attention_mask=mask)
    with pytest.raises(MeteoRAError, match="attention_mask row 1 has no real token"):
        generate(world["model"], ids, max_new_tokens=2, attention_mask=jnp.asarray(mask))


# ----------------------------------------------------------------------------- requests that cannot fit


@pytest.fixture
def small_device(monkeypatch):
    """Every device reports 100 KiB of memory (CPU devices normally report nothing)."""
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda self: {"bytes_limit": 100 * 1024})


def test_cpu_reports_no_memory_limit():
    """The check is skipped on CPU: its devices report no memory statistics."""
    assert device_memory_limit(jax.devices()[:1]) is None


def test_a_cache_larger_than_the_device_is_refused(world, small_device):
    model = world["model"]
    # 2 layers x 2 KV heads x 8 head dim x 4 bytes x (K and V) = 256 bytes per slot and row.
    with pytest.raises(MeteoRAError) as caught:
        model.init_cache(4, 256)
    message = str(caught.value)
    assert message.startswith("init_cache(batch=4, max_length=256): a KV cache of 4 rows x 256 slots")
    assert "needs 257.0 KiB, more than the 100.0 KiB of device memory" in message and "\n" not in message
    assert model.init_cache(1, 256).max_length == 256  # 65 KiB fits
    with pytest.raises(MeteoRAError, match=r"generate\(8 prompts padded to 16 tokens, max_new_tokens=200\)"):
        generate(model, np.ones((8, 3), np.int32), max_new_tokens=200)


def test_memory_limits_add_up_over_devices(monkeypatch):
    devices = jax.devices()
    monkeypatch.setattr(type(devices[0]), "memory_stats", lambda self: {"bytes_limit": 10})
    assert device_memory_limit(devices) == 10 * len(devices)
    monkeypatch.setattr(type(devices[0]), "memory_stats", lambda self: {"bytes_in_use": 3})
    assert device_memory_limit(devices) is None


def test_a_refused_name_says_where_it_came_from():
    """On the command line: the flag and the adapter's folder, before any folder is read."""
    with pytest.raises(ConfigError, match=r"^--adapter x: adapter name '\.\.'"):
        adapter_specs(["..=x"])
