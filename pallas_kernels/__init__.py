"""Pallas kernels for the MoE-LoRA op (TPU and GPU variants), each runnable in interpret mode on CPU.

    delta (M, O) = sum_j coef[m, j] * (x[m] @ A[ids[m, j]]) @ B[ids[m, j]]

with x (M, D), A (L, D, R), B (L, R, O), ids / coef (M, k). The library computes the routing,
coef = routing weight * adapter scale, and the base matmul x @ W; `moe_lora_delta` is the
differentiable rest (dx, dcoef, and dA / dB only when adapters are trained; see `ops`).

Files, split as jax's megablox is: `tiling` (the named `Tiling` bounds and the per-call `Plan`),
`grouping` (pure jnp: pairs sorted by group, tile visits; shared with the library's XLA grouped
path), `metadata` (pure jnp: packed layout, sorted-pair groups by pack, visits), `tpu` / `gpu`
(the `pallas_call`s, with cost estimates), `ops` (the custom-VJP op and dispatch), `reference`
(the jnp oracle and the dtype-keyed test tolerance). This package imports nothing of
`meteora_jax`; correctness and timings on an accelerator, next to the library's XLA paths, are
checked from above both: `python -m meteora_jax.bench.device_check [--small]`.

Packed rank layout. A rank-8 adapter padded alone to the 128 lanes of a TPU vreg / MXU tile
would waste 15/16 of every matmul. Instead adapters are packed side by side: the rank is rounded
up to a power-of-two slot S, G = W / S adapters share one pack of W lanes (W = 128 on TPU, 64 on
GPU, narrower when L*S is small), and Q = ceil(L / G) packs replace the L adapters:

    A (L, D, R) -> A_packed (Q, D_pad, W):  A_packed[q, :, g*S:(g+1)*S] = A[q*G + g] (zero-padded)
    B (L, R, O) -> B_packed (Q, W, O_pad):  B_packed[q, g*S:(g+1)*S, :] = B[q*G + g]

e.g. R = 8 on TPU: S = 8, G = 16, pack q holds adapters 16q .. 16q+15 in lanes 8g .. 8g+7.
Pairs (token, choice) are sorted and grouped by pack, not by adapter. The shrink multiplies a
row tile by its pack: x_tile (tm, D) @ A_packed[q] (D, W) yields the row's own adapter in its S
lanes, and the G-1 other adapters of the pack for free (the MXU would have spent those lanes on
zero padding anyway). Per row, a lane weight (coef on the row's own S lanes, 0 elsewhere) masks
the foreign lanes and applies the routing weight, so the expand h_tile (tm, W) @ B_packed[q]
(W, O) adds exactly coef * h @ B[adapter]. The same masks make the transposed products land in
the right slots: dA_packed[q] = x_sorted^T @ dh and dB_packed[q] = hw^T @ dy_sorted, unpacked
by the inverse reshape. Packing by pack also means fewer groups, so fewer partial-tile visits.
Ranks above W get one adapter per pack (S = R rounded up to whole lanes).

Kernels (details in `tpu` and `gpu`):
- prefill / training: grouped matmul (gmm) over pairs sorted by pack, for the shrink
  (x @ A), the expand (hw @ B) and the backward's dy @ B^T and dh @ A^T, plus a transposed
  grouped matmul (tgmm) for dA / dB. TPU: megablox-style, a static grid of (tile, pack) visits
  with the metadata as scalar prefetch driving the index maps, dead visits doing nothing. GPU
  (Triton has no scalar prefetch): one program per output block, looping inside the kernel over
  the packs of its row tile (gmm) or the row tiles of its pack (tgmm), metadata as plain inputs.
- decode (M <= `Tiling.decode_tokens`): no activation sorting; the grid walks the distinct
  chosen packs (scalar-prefetched on TPU, so the index map DMAs only those A / B slabs, each
  once), computing (x @ A[q]) * lane weights @ B[q] for all tokens at once.
"""

from pallas_kernels.ops import moe_lora_delta
from pallas_kernels.platform import target_platform
from pallas_kernels.reference import delta_reference, tolerance
from pallas_kernels.tiling import GPU_TILING, TPU_TILING, Plan, Tiling, default_tiling, make_plan

__all__ = [
    "GPU_TILING",
    "TPU_TILING",
    "Plan",
    "Tiling",
    "default_tiling",
    "target_platform",
    "delta_reference",
    "make_plan",
    "moe_lora_delta",
    "tolerance",
]
