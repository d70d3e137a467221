"""Kernel correctness and timings on an accelerator: `python -m pallas_kernels.device_check [--small]`.

Dimensions: M tokens, D in, O out, L adapters, R rank, k choices.

For each case (LLaMA-3-8B-like projections by default; tiny shapes with --small, which also
works on CPU in interpret mode) it prints one table row: the largest error of the output and of
dx, dcoef, dA, dB against `pallas_kernels.reference` (float32 XLA on the same device; the dense
statement at real sizes), relative to 1 + max |reference|, and the median milliseconds of the Pallas forward,
forward + backward with frozen adapters (gate-only training) and with trained adapters, next
to the XLA dense / grouped / gather backends of `meteora_jax.ops.moe_lora` (delta only) and
the base projection x @ W. Nothing depends on this script; it stops adding cases when its time
budget (default 240 s) is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ops import moe_lora_delta
from pallas_kernels.reference import delta_reference, delta_reference_dense


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: shapes, routing ("one": every token's first choice is adapter 0), dtype."""

    name: str
    m: int
    d: int
    o: int
    adapters: int
    rank: int
    k: int = 2
    routing: str = "one"
    dtype: str = "bfloat16"


FULL_CASES = (
    Case("prefill 28x r8", 512, 4096, 4096, 28, 8),
    Case("prefill 28x r8 f32", 512, 4096, 4096, 28, 8, dtype="float32"),
    Case("prefill 64x r64 spread", 512, 4096, 4096, 64, 64, routing="uniform"),
    Case("prefill mlp-up 28x r8", 2048, 4096, 14336, 28, 8),
    Case("prefill mlp-down 64x r64", 2048, 14336, 4096, 64, 64, routing="uniform"),
    Case("decode 1 tok 28x r8", 1, 4096, 4096, 28, 8),
    Case("decode 8 tok 64x r64", 8, 4096, 14336, 64, 64, routing="uniform"),
)
SMALL_CASES = (
    Case("small prefill", 40, 96, 80, 6, 8),
    Case("small prefill f32", 40, 96, 80, 6, 8, dtype="float32"),
    Case("small spread k4", 33, 64, 130, 12, 16, k=4, routing="uniform"),
    Case("small decode", 3, 64, 48, 5, 4),
)
TOLERANCE = {"float32": 2e-5, "bfloat16": 4e-2}  # as in tests/test_pallas_kernels.py


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random inputs of one case (ids distinct per token)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    ids = np.argsort(rng.random((case.m, case.adapters)), axis=1)[:, : case.k]
    if case.routing == "one":
        ids = np.where(ids == 0, ids[:, :1], ids)
        ids[:, 0] = 0
    return dict(
        x=jnp.asarray(rng.standard_normal((case.m, case.d)), dtype),
        w=jnp.asarray(rng.standard_normal((case.d, case.o)) / np.sqrt(case.d), dtype),
        a=jnp.asarray(rng.standard_normal((case.adapters, case.d, case.rank)) / np.sqrt(case.d), dtype),
        b=jnp.asarray(rng.standard_normal((case.adapters, case.rank, case.o)) / np.sqrt(case.rank), dtype),
        ids=jnp.asarray(ids, jnp.int32),
        coef=jnp.asarray(rng.uniform(0.1, 1.0, (case.m, case.k)), jnp.float32),
        cotangent=jnp.asarray(rng.standard_normal((case.m, case.o)), jnp.float32),
    )


def _loss(fn, p, x, a, b, coef):
    return jnp.sum(fn(x, a, b, p["ids"], coef).astype(jnp.float32) * p["cotangent"])


def _grads(fn, p, argnums):
    return jax.grad(functools.partial(_loss, fn, p), argnums=argnums)(p["x"], p["a"], p["b"], p["coef"])


def _xla_backends() -> dict:
    """The library's XLA delta paths, as (x, a, b, ids, coef) -> delta; empty if their names moved."""
    try:
        lib = importlib.import_module("meteora_jax.ops.moe_lora")
        from meteora_jax.ops.routing import Routing
    except ImportError:
        return {}
    paths = {}
    one = lambda a: jnp.ones((a.shape[0],), jnp.float32)  # noqa: E731  scale 1: coef already scaled
    if hasattr(lib, "_dense_delta") and hasattr(lib, "combine_weights"):
        paths["xla dense"] = lambda x, a, b, ids, c: lib._dense_delta(
            x, a, b, lib.combine_weights(Routing(ids=ids, weights=c), one(a), a.shape[0])
        )
    for name, attr in (("xla grouped", "_grouped_delta"), ("xla gather", "_gather_delta")):
        if hasattr(lib, attr):
            paths[name] = functools.partial(
                lambda f, x, a, b, ids, c: f(x, a, b, Routing(ids=ids, weights=c), one(a)), getattr(lib, attr)
            )
    return paths


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall time of fn(*args) in milliseconds, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def check_case(case: Case, *, interpret: bool | None, repeats: int) -> dict:
    """Errors and timings of one case, as a table row."""
    p = make_inputs(case)
    pallas = functools.partial(moe_lora_delta, interpret=interpret)
    frozen = functools.partial(moe_lora_delta, interpret=interpret, train_adapters=False)
    row = {
        "case": case.name,
        "M,D,O,L,R,k": f"{case.m},{case.d},{case.o},{case.adapters},{case.rank},{case.k}",
    }

    ours = jax.jit(
        lambda p: (pallas(p["x"], p["a"], p["b"], p["ids"], p["coef"]), _grads(pallas, p, (0, 1, 2, 3)))
    )
    # The per-token gather reference copies (M, k, D, R) weights: too big at real sizes.
    oracle = delta_reference if case.m * case.k * case.d * case.rank <= 2**24 else delta_reference_dense
    ref = jax.jit(
        lambda p: (oracle(p["x"], p["a"], p["b"], p["ids"], p["coef"]), _grads(oracle, p, (0, 1, 2, 3)))
    )
    (y, grads), (y_ref, grads_ref) = ours(p), ref({**p, **{n: p[n].astype(jnp.float32) for n in "xab"}})
    worst = 0.0
    for label, got, want in [
        ("y", y, y_ref),
        *zip(("dx", "dA", "dB", "dcoef"), grads, grads_ref, strict=True),
    ]:
        want = np.asarray(want, np.float32)
        err = float(np.abs(np.asarray(got, np.float32) - want).max()) / (1.0 + float(np.abs(want).max()))
        row[f"err {label}"] = f"{err:.1e}"
        worst = max(worst, err)
    row["ok"] = "yes" if worst <= TOLERANCE[case.dtype] else "NO"

    args = (p["x"], p["a"], p["b"], p["ids"], p["coef"])
    row["pallas fwd"] = median_ms(jax.jit(pallas), *args, repeats=repeats)
    row["fwd+bwd frozen"] = median_ms(jax.jit(lambda p: _grads(frozen, p, (0, 3))), p, repeats=repeats)
    row["fwd+bwd all"] = median_ms(jax.jit(lambda p: _grads(pallas, p, (0, 1, 2, 3))), p, repeats=repeats)
    for name, fn in _xla_backends().items():
        if name == "xla gather" and case.m > 64:
            continue  # its (M, k, D, R) gather is meant for decode only
        row[name] = median_ms(jax.jit(fn), *args, repeats=repeats)
    row["base x@W"] = median_ms(jax.jit(jnp.dot), p["x"], p["w"], repeats=repeats)
    return row


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [
        [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    print("(times: median milliseconds; errors: max abs / (1 + max |reference|))")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU interpret mode works)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    cases = SMALL_CASES if args.small or backend == "cpu" else FULL_CASES
    repeats = args.repeats or (3 if backend == "cpu" else 20)
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
    start, rows = time.perf_counter(), []
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            print(f"time budget spent: skipped {case.name} and later cases")
            break
        try:
            rows.append(check_case(case, interpret=None, repeats=repeats))
        except Exception as error:  # report and go on: one failing case must not hide the others
            rows.append({"case": case.name, "ok": f"ERROR {type(error).__name__}: {str(error)[:200]}"})
        print(f"  {case.name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    return 0 if all(row.get("ok") == "yes" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
