"""Tiling of the MoE-LoRA kernels: one named dataclass of upper bounds per platform, resolved per call.

Dimensions: M tokens, k choices per token, P = M*k (token, choice) pairs, D in, O out, L adapters,
R rank (padded to the largest). Packed layout (see `pallas_kernels` docstring): S rank slot
(R rounded up), G adapters per pack, W = G*S pack width (lanes), Q packs.

`Tiling` holds what a person tunes (bounds, platform flavour); `Plan` is what one call runs with:
every size resolved against the shapes, hashable, so it is the single static argument of the
differentiable op. Two rules shape the resolution:
- TPU (Mosaic) blocks: the last two block dims are multiples of (8, 128) (16 rows for bfloat16)
  or whole dims; the pack width W is a multiple of 128 so the MXU sees full lanes.
- GPU (Triton): every loaded block has a power-of-two size and every `dot` dim is >= 16.
Operands are zero-padded to whole tiles (D to `d_pad`, O to `o_pad`), which the kernels rely on:
no block ever reads out of bounds, so no kernel needs a remainder mask along D or O.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.grouping import tile_rows_for

FLAVORS = ("tpu", "gpu")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Upper bounds on the tile sizes and the kernel flavour; each call clamps them to its shapes.

    flavor: "tpu" (Mosaic: scalar-prefetched metadata drives the index maps) or "gpu" (Triton:
    metadata read inside the kernel, one program per output tile). tile_m: most sorted pairs per
    row tile (a call uses about the mean group size, a power of two). tile_d / tile_o: blocks of
    D and O. lanes: width of one pack of adapter ranks. decode_tokens: calls with at most this
    many tokens use the decode kernel (selected packs only, no sorting of activations).
    """

    flavor: str = "tpu"
    tile_m: int = 128
    tile_d: int = 512
    tile_o: int = 512
    lanes: int = 128
    decode_tokens: int = 16

    def __post_init__(self):
        if self.flavor not in FLAVORS:
            raise ValueError(f"Tiling.flavor {self.flavor!r} is not one of {FLAVORS}")
        for name in ("tile_m", "tile_d", "tile_o", "lanes"):
            value = getattr(self, name)
            if value < 1 or (self.flavor == "gpu" and value != _next_pow2(value)):
                raise ValueError(f"Tiling.{name}={value}: the gpu flavour needs a power of two")
        if self.flavor == "tpu":
            for name in ("tile_d", "tile_o", "lanes"):
                if getattr(self, name) % 128:
                    raise ValueError(
                        f"Tiling.{name}={getattr(self, name)}: tpu blocks need a multiple of 128"
                    )
            if self.tile_m % 16:
                raise ValueError(f"Tiling.tile_m={self.tile_m}: tpu row tiles need a multiple of 16")
        elif min(self.tile_m, self.tile_d, self.tile_o, self.lanes) < 16:
            raise ValueError("gpu tiles must be >= 16 (Triton dot)")
        if self.decode_tokens < 0:
            raise ValueError(f"Tiling.decode_tokens={self.decode_tokens} must be >= 0")


TPU_TILING = Tiling(flavor="tpu", tile_m=128, tile_d=512, tile_o=512, lanes=128, decode_tokens=16)
# Triton keeps the accumulator in registers: smaller row / column tiles, a 64-lane pack.
GPU_TILING = Tiling(flavor="gpu", tile_m=64, tile_d=64, tile_o=64, lanes=64, decode_tokens=16)


def default_tiling(platform: str) -> Tiling:
    """The tiling for a jax platform name ("tpu", "gpu", "cuda", "rocm"; "cpu" interprets the TPU flavour)."""
    return GPU_TILING if platform in ("gpu", "cuda", "rocm") else TPU_TILING


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: shapes, resolved tiles, pack layout, path and mode.

    tm: rows per tile; td / to: blocks of D / O, which `d_pad` / `o_pad` are multiples of.
    slot (S), per_pack (G), width (W), num_packs (Q): the packed rank layout. decode: use the
    decode kernel in the forward pass (rows_pad: its token rows, padded). train_adapters: None =
    dA / dB only for adapters being differentiated, False = never (frozen adapters).
    """

    flavor: str
    interpret: bool
    tokens: int
    choices: int
    d: int
    o: int
    adapters: int
    rank: int
    tm: int
    td: int
    to: int
    d_pad: int
    o_pad: int
    slot: int
    per_pack: int
    width: int
    num_packs: int
    decode: bool
    rows_pad: int
    train_adapters: bool | None = None

    @property
    def pairs(self) -> int:
        return self.tokens * self.choices

    @property
    def num_tiles(self) -> int:
        return -(-self.pairs // self.tm)

    @property
    def pairs_pad(self) -> int:
        return self.num_tiles * self.tm


def _block(n: int, bound: int, flavor: str) -> int:
    """The block of a dim of size n: the bound, shrunk for small n (TPU: 128-multiples, GPU: powers of 2)."""
    if flavor == "tpu":
        return min(bound, _round_up(n, 128))
    return min(bound, max(16, _next_pow2(n)))


def _pack_layout(rank: int, adapters: int, lanes: int, flavor: str) -> tuple[int, int, int]:
    """(S, G, W): rank slot, adapters per pack, pack width. Small ranks share one lane tile."""
    if rank > lanes:  # one adapter per pack, its rank padded to whole lanes
        slot = _round_up(rank, 128) if flavor == "tpu" else _next_pow2(rank)
        return slot, 1, slot
    slot = _next_pow2(rank)
    min_width = 128 if flavor == "tpu" else 16
    width = min(lanes, max(min_width, _next_pow2(adapters * slot)))
    return slot, width // slot, width


def make_plan(
    tiling: Tiling,
    *,
    tokens: int,
    choices: int,
    d: int,
    o: int,
    adapters: int,
    rank: int,
    itemsize: int,
    interpret: bool,
    train_adapters: bool | None = None,
) -> Plan:
    """Resolves `tiling` against one call's shapes (itemsize: bytes per element of the activations)."""
    flavor = tiling.flavor
    slot, per_pack, width = _pack_layout(rank, adapters, tiling.lanes, flavor)
    num_packs = -(-adapters // per_pack)
    min_rows = 16 if flavor == "gpu" or itemsize < 4 else 8
    tm = tile_rows_for(tokens * choices, num_packs, lo=min_rows, hi=max(min_rows, tiling.tile_m))
    td, to = _block(d, tiling.tile_d, flavor), _block(o, tiling.tile_o, flavor)
    decode = tokens <= tiling.decode_tokens
    rows_pad = _round_up(tokens, min_rows) if flavor == "tpu" else max(16, _next_pow2(tokens))
    return Plan(
        flavor=flavor,
        interpret=interpret,
        tokens=tokens,
        choices=choices,
        d=d,
        o=o,
        adapters=adapters,
        rank=rank,
        tm=tm,
        td=td,
        to=to,
        d_pad=_round_up(d, td),
        o_pad=_round_up(o, to),
        slot=slot,
        per_pack=per_pack,
        width=width,
        num_packs=num_packs,
        decode=decode,
        rows_pad=rows_pad,
        train_adapters=train_adapters,
    )
