"""Benchmarks and accelerator checks, above both the library and the kernels.

- `layer`: `meteora-jax bench layer|model`, MoE-LoRA cost as ratios to the base model;
- `generate`: `meteora-jax bench generate`, decode tokens/s against the base model;
- `torch_reference`: the reference implementation's algorithm in torch (optional: imported only
  when that comparison is asked for; needs the test extra, `pip install -e '.[test]'`);
- `device_check`: the Pallas kernels against the oracle and the XLA paths on an accelerator,
  `python -m meteora_jax.bench.device_check [--small]`;
- `timing`: the one timing harness all of them use (warm-up, interleaved repeats, medians).

Importing this package imports none of them (and never torch).
"""
