"""Kernel correctness and timings on an accelerator: `python -m meteora_jax.bench.device_check [--small]`.

Dimensions: M tokens, D in, O out, L adapters, R rank, k choices.

For each case (LLaMA-3-8B-like projections by default; tiny shapes with --small, which also
works on CPU in interpret mode) it prints one table row: the largest error of the Pallas output
and of dx, dcoef, dA, dB against the float32 oracle of `pallas_kernels.reference` (on the same
device; its dense statement at real sizes), relative to 1 + max |reference| and judged with
`pallas_kernels.reference.tolerance`, and the median milliseconds of the Pallas forward, forward
+ backward with frozen adapters (gate-only training) and with trained adapters, next to the
library's XLA backends (`meteora_jax.ops.lora_delta`: dense / grouped / gather, delta only) and
the base projection x @ W, all timed interleaved by `meteora_jax.bench.timing`.

Then one attention row: the platform's fused kernel ("auto" on this device: cuDNN flash
attention on GPU, splash on TPU; splash in interpret mode with --small on CPU) against XLA on
packed causal rows, its largest error on real tokens and the forward / forward + backward
milliseconds of both.

It fails loudly: a column (kernel, gradient, backend) that cannot be built or run prints its
traceback, shows ERROR in the table, and makes the exit status 1 once the other columns are
done; so does an error above the tolerance. It stops adding cases when its time budget
(default 240 s) is spent, and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.bench.timing import BENCH_DTYPE, interleaved, medians
from meteora_jax.config import TOP_K
from meteora_jax.modeling.attention import AttentionMask, attend, resolve_attention
from meteora_jax.ops import lora_delta
from meteora_jax.ops.routing import Routing
from pallas_kernels import moe_lora_delta
from pallas_kernels.reference import delta_reference, delta_reference_dense, tolerance


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: shapes, routing ("one": every token's first choice is adapter 0), dtype."""

    name: str
    m: int
    d: int
    o: int
    adapters: int
    rank: int
    k: int = TOP_K
    routing: str = "one"
    dtype: str = BENCH_DTYPE


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
# Table column -> `lora_delta` backend. The gather backend copies (M, k, D, R) weights: it is
# meant for decode and timed only up to GATHER_MAX_TOKENS.
XLA_COLUMNS = {
    "xla dense": "xla",
    "xla grouped": "xla_grouped",
    "xla gather": "xla_gather",
    "ragged_dot": "ragged",
}
GATHER_MAX_TOKENS = 64


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


def xla_delta(backend: str):
    """(x, a, b, ids, coef) -> delta through the library's `lora_delta` (scale 1: coef is scaled)."""

    def delta(x, a, b, ids, coef):
        scale_l = jnp.ones((a.shape[0],), jnp.float32)
        return lora_delta(x, a, b, Routing(ids=ids, weights=coef), scale_l, backend=backend)

    return delta


class Failures:
    """Every column that failed: its traceback is printed at once (stderr), the cell shows ERROR."""

    def __init__(self):
        self.labels: list[str] = []

    def attempt(self, row: dict, label: str, fn) -> tuple[bool, object]:
        """(True, fn()), or (False, None) if fn raises (traceback printed, row[label] = "ERROR")."""
        try:
            return True, fn()
        except Exception:
            print(f"ERROR in {row['case']} / {label}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            self.labels.append(f"{row['case']} / {label}")
            row[label] = "ERROR"
            return False, None


def _errors(case: Case, p: dict, pallas) -> dict[str, float]:
    """Largest error of y and every gradient, relative to 1 + max |reference|."""
    ours = jax.jit(
        lambda p: (pallas(p["x"], p["a"], p["b"], p["ids"], p["coef"]), _grads(pallas, p, (0, 1, 2, 3)))
    )
    # The per-token gather reference copies (M, k, D, R) weights: too big at real sizes.
    oracle = delta_reference if case.m * case.k * case.d * case.rank <= 2**24 else delta_reference_dense
    ref = jax.jit(
        lambda p: (oracle(p["x"], p["a"], p["b"], p["ids"], p["coef"]), _grads(oracle, p, (0, 1, 2, 3)))
    )
    (y, grads), (y_ref, grads_ref) = ours(p), ref({**p, **{n: p[n].astype(jnp.float32) for n in "xab"}})
    errors = {}
    for label, got, want in [
        ("y", y, y_ref),
        *zip(("dx", "dA", "dB", "dcoef"), grads, grads_ref, strict=True),
    ]:
        want = np.asarray(want, np.float32)
        errors[label] = float(np.abs(np.asarray(got, np.float32) - want).max()) / (
            1.0 + float(np.abs(want).max())
        )
    return errors


def check_case(case: Case, failures: Failures, *, interpret: bool | None, repeats: int) -> dict:
    """Errors and timings of one case, as a table row (failed columns: "ERROR", see `failures`)."""
    p = make_inputs(case)
    pallas = functools.partial(moe_lora_delta, interpret=interpret)
    frozen = functools.partial(moe_lora_delta, interpret=interpret, train_adapters=False)
    row = {
        "case": case.name,
        "M,D,O,L,R,k": f"{case.m},{case.d},{case.o},{case.adapters},{case.rank},{case.k}",
    }
    ran, errors = failures.attempt(row, "ok", lambda: _errors(case, p, pallas))
    if ran:
        row.update({f"err {label}": f"{err:.1e}" for label, err in errors.items()})
        row["ok"] = "yes" if max(errors.values()) <= tolerance(case.dtype) else "NO"

    args = (p["x"], p["a"], p["b"], p["ids"], p["coef"])
    columns = {  # zero-argument runs, each jitted once
        "pallas fwd": functools.partial(jax.jit(pallas), *args),
        "fwd+bwd frozen": functools.partial(jax.jit(lambda p: _grads(frozen, p, (0, 3))), p),
        "fwd+bwd all": functools.partial(jax.jit(lambda p: _grads(pallas, p, (0, 1, 2, 3))), p),
    }
    for name, backend in XLA_COLUMNS.items():
        if backend == "xla_gather" and case.m > GATHER_MAX_TOKENS:
            row[name] = "n/a (decode only)"
        else:
            columns[name] = functools.partial(jax.jit(xla_delta(backend)), *args)
    columns["base x@W"] = functools.partial(jax.jit(jnp.dot), p["x"], p["w"])
    _time_columns(row, columns, failures, repeats)
    return row


def _time_columns(row: dict, columns: dict, failures: Failures, repeats: int) -> None:
    """row[name] = median ms of each zero-argument run in `columns`. Each is compiled and run once
    on its own, so one that fails is reported and the others are still timed; then the survivors
    are timed together, interleaved."""
    runs = {}
    for name, run in columns.items():
        if failures.attempt(row, name, lambda run=run: jax.block_until_ready(run()))[0]:
            runs[name] = run
    _, seconds = failures.attempt(row, "timing", lambda: medians(interleaved(runs, repeats, warmup=0)))
    for name, s in (seconds or {}).items():
        row[name] = 1e3 * s


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Packed causal self-attention: two samples per row, then padding."""

    name: str
    batch: int
    length: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = BENCH_DTYPE


FULL_ATTENTION = AttentionCase("attention 2048 tok 32/8 heads", 2, 2048, 32, 8, 128)
SMALL_ATTENTION = AttentionCase("small attention", 1, 256, 4, 2, 32, dtype="float32")


def check_attention(
    case: AttentionCase, failures: Failures, *, repeats: int, kernel: str | None = None
) -> dict:
    """The fused kernel (`kernel`, default what "auto" runs here; "splash" on CPU) against XLA."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(case.dtype)
    b, t, n, k, h = case.batch, case.length, case.heads, case.kv_heads, case.head_dim
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype) for heads in (n, k, k))
    seg = np.zeros((b, t), np.int32)
    seg[:, : t // 3], seg[:, t // 3 : t - t // 8] = 1, 2
    real = seg > 0
    seg = jnp.asarray(seg)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    if kernel is None:
        kernel = resolve_attention("auto", dtype=dtype, head_dim=h, length=t, cached=False)
        kernel = "splash" if kernel == "xla" else kernel
    masks = {
        "xla": AttentionMask(allowed_bts=allowed),
        kernel: AttentionMask(segment_ids_bt=seg, implementation=kernel),
    }
    row = {"case": case.name, "B,T,N,K,H": f"{b},{t},{n},{k},{h}", "kernel": kernel}
    forward = {name: jax.jit(functools.partial(attend, mask=m)) for name, m in masks.items()}
    both = {
        name: jax.jit(
            jax.grad(lambda q, kk, v, f=f: jnp.sum(f(q, kk, v).astype(jnp.float32)), argnums=(0, 1, 2))
        )
        for name, f in forward.items()
    }

    def error():
        got = np.asarray(forward[kernel](q, kk, v), np.float32)[real]
        want = np.asarray(attend(*(a.astype(jnp.float32) for a in (q, kk, v)), masks["xla"]))[real]
        return float(np.abs(got - want).max()) / (1.0 + float(np.abs(want).max()))

    ran, err = failures.attempt(row, "ok", error)
    if ran:
        row["err out"] = f"{err:.1e}"
        row["ok"] = "yes" if err <= tolerance(case.dtype) else "NO"
    columns = {}
    for name in masks:
        columns[f"{name} fwd"] = functools.partial(forward[name], q, kk, v)
        columns[f"{name} fwd+bwd"] = functools.partial(both[name], q, kk, v)
    _time_columns(row, columns, failures, repeats)
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
    """Runs the cases and prints the table. Returns 0 when every column ran and every error is
    within tolerance, 1 otherwise (failed columns are listed last)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU interpret mode works)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    cases = SMALL_CASES if args.small or backend == "cpu" else FULL_CASES
    repeats = args.repeats or (3 if backend == "cpu" else 20)
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
    start, rows, failures = time.perf_counter(), [], Failures()
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            print(f"time budget spent: skipped {case.name} and later cases")
            break
        rows.append(check_case(case, failures, interpret=None, repeats=repeats))
        print(f"  {case.name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    attention = SMALL_ATTENTION if args.small or backend == "cpu" else FULL_ATTENTION
    attention_row = check_attention(attention, failures, repeats=repeats)
    print_table([attention_row])
    rows.append(attention_row)
    if failures.labels:
        print(f"FAILED (tracebacks above): {', '.join(failures.labels)}")
    too_large = [row["case"] for row in rows if row.get("ok") == "NO"]
    if too_large:
        print(f"errors above tolerance: {', '.join(too_large)}")
    return 1 if failures.labels or too_large else 0


if __name__ == "__main__":
    raise SystemExit(main())
