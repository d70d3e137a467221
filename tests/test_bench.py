"""`meteora-jax bench`: runs end to end at tiny sizes and reports ratios (no timing is asserted)."""

import json
import sys

import pytest

import meteora_jax.bench
from meteora_jax.bench import device_check
from meteora_jax.bench.train import TrainBenchSettings
from meteora_jax.cli import main
from meteora_jax.config import PROJECTIONS
from meteora_jax.errors import ConfigError
from pallas_kernels.reference import delta_reference

pytestmark = pytest.mark.slow


def _tiny_layer(monkeypatch) -> None:
    """`bench layer` / `bench train` at a tiny layer instead of LLaMA-3-8B's."""
    import dataclasses

    import meteora_jax.commands.bench as command

    tiny = dataclasses.replace(
        command.LLAMA3_8B_LAYER, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    monkeypatch.setattr(command, "LLAMA3_8B_LAYER", tiny)


def test_bench_layer_writes_ratios(tmp_path, monkeypatch, capsys):
    _tiny_layer(monkeypatch)
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
        assert set(row["reference_wall_ratio"]) == {"meteora[xla]", "meteora[xla_grouped]"}
        # what "auto" ran, per projection: prefill 24 x top-2 is past the decode rule, decode 2 x 2 is not
        assert sorted(p for names in row["auto"].values() for p in names) == sorted(PROJECTIONS)
    assert set(rows[1]["auto"]) == {"xla_gather"}
    out = capsys.readouterr().out
    assert "torch reference algorithm" in out and "auto ran xla_gather (q_proj, k_proj" in out


def test_bench_model_times_the_public_call_beside_its_program_and_torch(tmp_path, capsys):
    out = tmp_path / "model.json"
    argv = ["bench", "model", "--layers", "1", "--tokens", "12", "--adapters", "3", "--rank", "2"]
    assert main([*argv, "--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    timed = {"base", "meteora", "base[program]", "meteora[program]", "torch_base", "torch_reference"}
    timed |= {"matmul", "torch_matmul"}
    assert set(row["ms"]) == timed and all(ms > 0 for ms in row["ms"].values())
    assert set(row["call_over_program"]) == {"base", "meteora"}
    assert row["torch_reference_over_torch_base"] > 0 and row["torch_base_over_ours"] > 0
    assert row["torch_matmul_over_ours"] > 0
    assert "public call over its program" in capsys.readouterr().out


def test_bench_rejects_bad_settings(capsys):
    assert main(["bench", "layer", "--adapters", "2", "--top-k", "3", "--no-torch"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert main(["bench", "model", "--backend", "fast"]) == 2  # refused at parse time, before any model
    assert "argument --backend: invalid choice: 'fast'" in capsys.readouterr().err


def test_bench_layer_without_torch_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, "meteora_jax.bench.torch_reference", raising=False)
    monkeypatch.delattr(meteora_jax.bench, "torch_reference", raising=False)  # as if never imported
    assert main(["bench", "layer", "--adapters", "2", "--rank", "2", "--tokens", "8"]) == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err


def test_bench_generate_runs(tmp_path, monkeypatch):
    import meteora_jax.commands.bench as command

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    original = command.GenerateBenchSettings
    monkeypatch.setattr(command, "GenerateBenchSettings", lambda **kw: original(**{**kw, **tiny}))
    out = tmp_path / "gen.json"
    argv = ["bench", "generate", "--adapters", "3", "--rank", "2", "--batch", "1", "--new-tokens", "3"]
    assert main([*argv, "--prompt-length", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["results"]
    assert report


def test_bench_serve_reports_throughput_and_first_token_per_concurrency(tmp_path, monkeypatch, capsys):
    """`bench serve` drives the engine with 1 and 3 clients for the fused model and its base: every
    request's tokens are counted (tokens/s > 0), every figure is there, and the table says it."""
    import meteora_jax.commands.bench as command

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    original = command.GenerateBenchSettings
    monkeypatch.setattr(command, "GenerateBenchSettings", lambda **kw: original(**{**kw, **tiny}))
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--adapters", "3", "--rank", "2", "--clients", "1", "3", "--new-tokens", "3"]
    assert main([*argv, "--prompt-length", "5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["clients"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        for name in ("base", "meteora"):
            assert row[name]["tokens_per_s"] > 0 and row[name]["first_token_s"] > 0
    assert set(report["scaling"]) == {"base", "meteora"}
    assert "| 3 |" in capsys.readouterr().out
    assert main(["bench", "serve", "--clients", "0"]) == 2
    assert "clients must be positive, got (0,)" in capsys.readouterr().err


def test_bench_generate_shape_sizes_the_model(monkeypatch):
    """--shape llama3-8b builds LLaMA-3-8B layers (8192-token vocabulary), --layers sets their number."""
    import meteora_jax.commands.bench as command

    seen = []
    monkeypatch.setattr(
        command, "bench_generate", lambda s: seen.append(s) or {"settings": {}, "results": []}
    )
    monkeypatch.setattr(command, "format_bench", lambda report: "")
    assert main(["bench", "generate", "--shape", "llama3-8b", "--layers", "2"]) == 0
    assert main(["bench", "generate"]) == 0
    big, small = seen
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.vocab_size) == (
        4096,
        14336,
        2,
        8192,
    )
    assert (big.num_attention_heads, big.num_key_value_heads) == (32, 8)
    assert (small.hidden_size, small.num_hidden_layers) == (512, 4)


def test_bench_refuses_layers_below_one(capsys):
    assert main(["bench", "generate", "--layers", "0"]) == 2
    assert "--layers must be at least 1, got 0" in capsys.readouterr().err


def test_bench_shape_conflicts_are_named(tmp_path, capsys):
    """--shape with --base (two sizes for one model) or outside `bench generate` is refused, not ignored."""
    assert main(["bench", "generate", "--shape", "llama3-8b", "--base", str(tmp_path)]) == 2
    assert f"--shape and --base both size the model (--base {tmp_path})" in capsys.readouterr().err
    assert main(["bench", "layer", "--shape", "small"]) == 2
    assert "--shape sizes `bench generate|serve|model`, not `bench layer`" in capsys.readouterr().err


def test_device_check_small_runs_on_cpu(capsys):
    """The --small path: every kernel in interpret mode, every XLA column, errors within tolerance."""
    assert device_check.main(["--small", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for case in (*device_check.SMALL_CASES, device_check.SMALL_ATTENTION):
        row = next(line for line in out.splitlines() if line.startswith(case.name + " "))
        assert " yes " in row and "ERROR" not in row, row
    assert "ragged_dot" in out and "splash fwd+bwd" in out  # every column made it into the tables


def test_device_check_fails_loudly_when_a_backend_breaks(monkeypatch, capsys):
    def broken(x, a, b, routing, scale, *, backend):
        if backend == "xla_grouped":
            raise RuntimeError("grouped backend broken")
        return original(x, a, b, routing, scale, backend=backend)

    original = device_check.lora_delta
    monkeypatch.setattr(device_check, "lora_delta", broken)
    # The jnp oracle stands in for the kernels: this test is about the reporting, and fast.
    monkeypatch.setattr(
        device_check,
        "moe_lora_delta",
        lambda x, a, b, ids, coef, **_: delta_reference(x, a, b, ids, coef).astype(x.dtype),
    )
    monkeypatch.setattr(device_check, "SMALL_CASES", device_check.SMALL_CASES[-1:])
    assert device_check.main(["--small", "--repeats", "1"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "grouped backend broken" in captured.err
    assert "FAILED (tracebacks above): small decode / xla grouped" in captured.out
    failures = device_check.Failures()
    row = device_check.check_case(device_check.SMALL_CASES[0], failures, interpret=None, repeats=1)
    assert row["xla grouped"] == "ERROR" and failures.labels == ["small decode / xla grouped"]
    assert row["ok"] == "yes" and all(isinstance(row[c], float) for c in ("xla dense", "base x@W"))


def test_bench_train_compares_gate_training_with_a_plain_lora_step(tmp_path, monkeypatch, capsys):
    _tiny_layer(monkeypatch)
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--mixtures", "4x2", "3x4", "--tokens", "16", "--repeats", "1"]
    argv += ["--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["adapters"], r["rank"]) for r in rows] == [(4, 2), (3, 4)]
    for row in rows:
        assert row["ratio"]["lora"] == 1.0 and set(row["ratio"]) == {"lora", "gates", "gates+adapters"}
        assert all(r > 0 for r in row["ratio"].values()) and all(b > 0 for b in row["peak_bytes"].values())
    assert "plain LoRA r8" in capsys.readouterr().out
    assert main(["bench", "train", "--mixtures", "4by2"]) == 2


def test_bench_train_memory_only_reports_peak_memory_without_timing(tmp_path, monkeypatch, capsys):
    """--memory-only compiles the three steps (here with full remat) and reports their peak
    temporaries, no timing."""
    _tiny_layer(monkeypatch)
    out = tmp_path / "memory.json"
    argv = ["bench", "train", "--mixtures", "4x2", "--tokens", "32", "--memory-only", "--remat", "full"]
    assert main([*argv, "--json", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "remat full, attention auto]: peak temporaries: lora " in line and " ms" not in line
    (row,) = json.loads(out.read_text())["results"]
    assert "ratio" not in row and row["remat"] == "full"
    assert set(row["peak_bytes"]) == {"lora", "gates", "gates+adapters"} and all(row["peak_bytes"].values())
    assert main(["bench", "train", "--remat", "some"]) == 2
    assert "meteora-jax bench: error: argument --remat: invalid choice: 'some'" in capsys.readouterr().err


def test_bench_train_settings_name_a_bad_remat_or_attention():
    with pytest.raises(ConfigError, match=r"bench train: remat='some' is not one of"):
        TrainBenchSettings(remat="some")
    with pytest.raises(ConfigError, match=r"bench train: attention='flash' is not one of"):
        TrainBenchSettings(attention="flash")


def test_the_timed_torch_reference_computes_the_meteora_layer():
    """The torch algorithm `bench layer` times against ours is the MoE-LoRA layer: its output
    equals the jnp oracle's on the same weights (float32, scale 1), so the ratio compares like
    with like."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from meteora_jax.bench.torch_reference import GatherBmmLinear
    from meteora_jax.ops.moe_lora_reference import moe_lora_reference
    from meteora_jax.ops.routing import RoutingSettings

    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False)
    layer = GatherBmmLinear(base, n_adapters=5, rank=3, top_k=2, generator=generator)
    x = torch.randn(7, 24, generator=generator)
    with torch.no_grad():
        got = layer(x).numpy()
    want, routing = moe_lora_reference(
        jnp.asarray(x.numpy()),
        jnp.asarray(base.weight.detach().numpy().T),  # (in, out)
        jnp.asarray(layer.gate.numpy().T),  # (in, L)
        jnp.asarray(layer.a.numpy().transpose(0, 2, 1)),  # (L, in, r)
        jnp.asarray(layer.b.numpy().transpose(0, 2, 1)),  # (L, r, out)
        jnp.ones(5),
        RoutingSettings(temperature=jnp.float32(1.0), top_k=2),
    )
    assert np.abs(np.asarray(want) - np.asarray(layer.base(x).detach().numpy())).max() > 1e-3  # adapters act
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-5)


def test_the_generate_and_serve_reports_are_markdown_tables_of_their_results():
    from meteora_jax.bench.decoding import GenerateBenchSettings, format_bench
    from meteora_jax.bench.server_load import ServeBenchSettings, format_serve

    model = GenerateBenchSettings().__dict__
    results = [
        {"batch": 8, "clients": 4, "decode_ratio": 0.9, "throughput_ratio": 0.75,
         "base": {"decode_tokens_per_s": 800.0, "prefill_s": 0.08,
                  "tokens_per_s": 40.0, "first_token_s": 0.1},
         "meteora": {"decode_tokens_per_s": 720.0, "prefill_s": 0.096,
                     "tokens_per_s": 30.0, "first_token_s": 0.11}}
    ]  # fmt: skip
    text = format_bench({"settings": model, "device": "cpu:0", "results": results}).splitlines()
    assert text[0].startswith(
        "28 adapters (rank 8, top-2) vs base; D=512, 4 layers, prompt 64, 32 new tokens"
    )
    assert text[0].endswith(", median of 5; cpu:0") and text[1] == ""
    assert (
        text[2].startswith("| batch | base decode tok/s |") and text[3] == "|---:|---:|---:|---:|---:|---:|"
    )
    assert text[4:] == ["| 8 | 800.0 | 720.0 | 0.90 | 80.0 | 96.0 |"]
    serve = {"model": model, "serve": ServeBenchSettings().__dict__}
    report = {"settings": serve, "device": "cpu:0", "results": results, "scaling": {"base": 3.0},
              "first_token_growth": {"base": 1.1}}  # fmt: skip
    text = format_serve(report).splitlines()
    assert "; 2 requests per client, prompt 32, 32 new tokens, 16 slots, median of 5; cpu:0" in text[0]
    assert text[4] == "| 4 | 40.0 | 30.0 | 0.75 | 100.0 | 110.0 |" and text[5] == ""
    assert text[6:] == ["throughput at 16 clients over 1: base 3.0x; time to first token: base 1.1x"]
