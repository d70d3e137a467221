"""The `meteora-jax` command: its error path and shared training flags (the demo itself:
tests/test_demo.py)."""

import argparse
import dataclasses

import pytest

from meteora_jax.cli import build_parser, main
from meteora_jax.commands.training_flags import add_training_flags, data_config, run_settings, train_settings
from meteora_jax.data.pipeline import DataConfig
from meteora_jax.errors import ConfigError
from meteora_jax.sharding import DEFAULT_MESH
from meteora_jax.training.adapters import LoRASpec, lora_train_config
from meteora_jax.training.gates import RunSpec
from meteora_jax.training.loop import Job
from meteora_jax.training.train_config import TRAIN_BACKEND, RunOptions, TrainConfig


def test_unknown_command_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteora-jax: error: argument command: invalid choice: 'frobnicate'")
    assert err.count("\n") == 1


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["demo", "--fast", "--no-progress", "--out", "."]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meteora-jax demo: error: --out .") and "\n" not in err


@pytest.mark.parametrize("command", ["train-gate", "train-lora"])
def test_closed_sets_are_refused_at_parse_time(command, tmp_path, capsys):
    """--backend names one of the MoE-LoRA backends; a typo is refused before any file is read."""
    argv = [command, "--base", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    argv += ["--adapter", str(tmp_path)] if command == "train-gate" else []
    assert main([*argv, "--backend", "palas"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meteora-jax {command}: error: argument --backend: invalid choice: 'palas'")
    assert "'pallas'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_training_defaults_are_declared_once():
    """With no --mesh / --backend, a run gets the specs' own defaults (one declaration each)."""
    parser = argparse.ArgumentParser()
    add_training_flags(parser)
    args = parser.parse_args(["--base", "b"], argparse.Namespace(out="o"))
    settings = run_settings(args)
    assert TrainConfig(**train_settings(args)) == TrainConfig()
    assert data_config(args) == DataConfig()
    assert settings["options"] == RunOptions()
    assert (RunOptions().mesh, RunOptions().backend) == (DEFAULT_MESH, TRAIN_BACKEND)
    for spec in (RunSpec, LoRASpec, Job):
        fields = {f.name: f for f in dataclasses.fields(spec)}
        assert fields["options"].default_factory is RunOptions
        assert not {"mesh", "backend", "attention", "progress"} & set(fields)


def test_run_options_refuse_an_unknown_backend_or_attention_by_name():
    with pytest.raises(ConfigError, match=r"run options: backend must be one of \(.*'pallas'\), got 'palas'"):
        RunOptions(backend="palas")
    with pytest.raises(ConfigError, match=r"attention must be one of .*, got 'flash'"):
        RunOptions(attention="flash")


def test_train_lora_flags_default_to_the_library_lora_settings(tmp_path):
    """train-lora's own defaults (learning rate, clipping, response-only loss) are the library's."""
    from meteora_jax.commands.train_lora import spec_from_args

    argv = ["train-lora", "--base", "b", "--data", "d", "--out", str(tmp_path / "o")]
    spec = spec_from_args(build_parser().parse_args(argv))
    assert spec.train == lora_train_config(TrainConfig().steps)
    assert spec.data == DataConfig(lm_loss="response")


def test_the_demo_keeps_compiled_programs_in_its_folder_unless_jax_has_a_cache(tmp_path):
    import jax

    from meteora_jax.commands.demo import use_compile_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        use_compile_cache(str(tmp_path / "run"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "run" / "xla-cache")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        use_compile_cache(str(tmp_path / "run"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
