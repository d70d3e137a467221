"""`meteora-jax bench`: runs end to end at tiny sizes and reports ratios (no timing is asserted)."""

import json

import pytest

from meteora_jax.cli import main

pytestmark = pytest.mark.slow


def test_bench_layer_writes_ratios(tmp_path, monkeypatch, capsys):
    import dataclasses

    import meteora_jax.commands.bench as command

    tiny = dataclasses.replace(
        command.LLAMA3_8B_LAYER, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    monkeypatch.setattr(command, "LLAMA3_8B_LAYER", tiny)
    out = tmp_path / "bench.json"
    argv = ["bench", "layer", "--adapters", "4", "--rank", "4", "--tokens", "24", "--decode-tokens", "2"]
    argv += ["--decode-context", "8", "--backend", "xla", "xla_grouped", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["phase"], r["tokens"]) for r in rows] == [("prefill", 24), ("decode", 2)]
    for row in rows:
        assert row["ratio"]["base"] == 1.0
        assert set(row["ratio"]) == {"base", "lora", "meteora[xla]", "meteora[xla_grouped]"}
        assert all(r > 0 for r in row["ratio"].values())
        assert row["torch_reference_ratio"] > 0 and row["peak_bytes"]["meteora[xla]"] > 0
    assert "torch reference algorithm" in capsys.readouterr().out


def test_bench_rejects_bad_settings(capsys):
    assert main(["bench", "layer", "--adapters", "2", "--top-k", "3", "--no-torch"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_bench_generate_runs(tmp_path, monkeypatch):
    import meteora_jax.bench_generate as bench_generate

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    original = bench_generate.GenerateBenchSettings
    monkeypatch.setattr(bench_generate, "GenerateBenchSettings", lambda **kw: original(**{**kw, **tiny}))
    out = tmp_path / "gen.json"
    argv = ["bench", "generate", "--adapters", "3", "--rank", "2", "--batch", "1", "--new-tokens", "3"]
    assert main([*argv, "--prompt-length", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["results"]
    assert report
