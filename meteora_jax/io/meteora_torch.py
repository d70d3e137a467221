"""The MeteoRA PyTorch reference checkpoint: one `model.safetensors` holding the whole PEFT-wrapped
state dict, read into our stacked layout and written back out.

Per adapted projection, under `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.`:
`base_layer.weight` (out, in), `lora_A.weight` (L*r, in), `lora_B.weight` (out, L*r) and
`moe_gate.weight` (L, in); adapter i owns rows / columns [i*r, (i+1)*r) and gate row i. The
other base tensors sit under `base_model.model.` with their HF names (a projection no adapter
targets is not wrapped, so it keeps its plain `{proj}.weight`). The file stores neither the
scalings nor the adapter order: both come from the adapters the user passes, in training order.

Reading accepts a gates-only file (`moe_gate.weight` entries alone) or a full state dict, whose
stacked lora_A / lora_B then replace the adapters' weights. Base tensors in the file must equal
the base folder's (a file in a lower precision is compared with the base rounded to it).
Everything else is an error, collected and raised once: a missing or mis-shaped gate, gates of
a projection no given adapter targets (the reference wraps exactly the targeted projections, so
such gates mean other adapters than the ones given), and LoRA values outside an adapter's own
rank or module (we could not write them back out as PEFT adapters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from meteora_jax.config import BLOCK_OF, PROJECTIONS, LlamaConfig, MoELoRAConfig, projection_shape
from meteora_jax.errors import CheckpointError, ConfigError, MissingFileError
from meteora_jax.io.checkpoint import base_fingerprint, expected_shapes, model_params
from meteora_jax.io.files import raise_problems, staged_directory, write_text_atomic
from meteora_jax.io.hf import HF_KEY_TABLE, IGNORED_KEYS, weight_files
from meteora_jax.io.peft import LoRAAdapter
from meteora_jax.io.safetensors_io import FLOAT_DTYPES, SafetensorsFile, save_file
from meteora_jax.io.stacking import AdapterInfo, ParamPath, param_path

PREFIX = "base_model.model."
WEIGHTS_FILE = "model.safetensors"
ORDER_FILE = "adapter_order.json"
_CHUNK = 1 << 22  # elements compared at a time, so a 2 GB embedding never sits in memory twice


@dataclasses.dataclass(frozen=True)
class MoEPart:
    """One per-projection MeteoRA tensor of the reference and the stacked leaf of ours it fills.

    Shapes of one layer: file `file_shape(n, r, d_in, d_out)`; ours gate (in, L), lora_a
    (L, in, R), lora_b (L, R, out). `to_ours(t, n, r)` / `to_file(x)` convert one layer.
    """

    part: str
    leaf: str
    file_shape: Callable[[int, int, int, int], tuple[int, int]]
    to_ours: Callable[[np.ndarray, int, int], np.ndarray]
    to_file: Callable[[np.ndarray], np.ndarray]

    def key(self, layer: int, projection: str) -> str:
        return f"{PREFIX}model.layers.{layer}.{BLOCK_OF[projection]}.{projection}.{self.part}.weight"


GATE = MoEPart("moe_gate", "gate", lambda n, r, i, o: (n, i), lambda t, n, r: t.T, lambda g_dl: g_dl.T)
LORA_A = MoEPart(
    "lora_A",
    "lora_a",
    lambda n, r, i, o: (n * r, i),
    lambda t, n, r: t.reshape(n, r, t.shape[1]).transpose(0, 2, 1),
    lambda a_ldr: a_ldr.transpose(0, 2, 1).reshape(-1, a_ldr.shape[1]),
)
LORA_B = MoEPart(
    "lora_B",
    "lora_b",
    lambda n, r, i, o: (o, n * r),
    lambda t, n, r: t.reshape(t.shape[0], n, r).transpose(1, 2, 0),
    lambda b_lro: b_lro.transpose(2, 0, 1).reshape(b_lro.shape[2], -1),
)
MOE_PARTS = {p.part: p for p in (GATE, LORA_A, LORA_B)}
_MODULES = "|".join(rf"{BLOCK_OF[p]}\.{p}" for p in PROJECTIONS)
MOE_KEY = re.compile(
    rf"{re.escape(PREFIX)}model\.layers\.(?P<layer>\d+)\.(?P<module>{_MODULES})\.(?P<part>moe_gate|lora_A|lora_B)\.weight"
)
_WRAPPED = ".base_layer.weight"


def reference_base_key(hf_key: str, targets: Sequence[str]) -> str:
    """The reference's name of a base tensor: projections any adapter targets are wrapped."""
    for rule in HF_KEY_TABLE:
        match = rule.pattern.fullmatch(hf_key)
        if match and rule.stacked and rule.ours[2] in targets and rule.ours[-1] == "kernel":
            return f"{PREFIX}{hf_key[: -len('.weight')]}{_WRAPPED}"
    return f"{PREFIX}{hf_key}"


def _hf_key(key: str, num_layers: int) -> str | None:
    """The HF name of a reference base tensor, or None when it is not one."""
    if not key.startswith(PREFIX):
        return None
    hf = key[len(PREFIX) :]
    if hf.endswith(_WRAPPED):
        hf = hf[: -len(_WRAPPED)] + ".weight"
    for rule in HF_KEY_TABLE:
        match = rule.pattern.fullmatch(hf)
        if match and (not rule.stacked or int(match.group(1)) < num_layers):
            return hf
    return None


@dataclasses.dataclass(frozen=True)
class _Index:
    """A reference file's tensors sorted out: MeteoRA parts by (part, projection) -> {layer: key}."""

    moe: dict[tuple[str, str], dict[int, str]]
    base: dict[str, str]  # file key -> HF key
    problems: list[str]


def _index(file: SafetensorsFile, num_layers: int) -> _Index:
    moe: dict[tuple[str, str], dict[int, str]] = {}
    base, problems = {}, []
    for key in file.names():
        match = MOE_KEY.fullmatch(key)
        if match:
            layer, proj = int(match["layer"]), match["module"].split(".")[1]
            if layer >= num_layers:
                problems.append(
                    f"tensor {key} is for layer {layer}, but the base model has {num_layers} layers"
                )
            else:
                moe.setdefault((match["part"], proj), {})[layer] = key
            continue
        hf = _hf_key(key, num_layers)
        if hf is not None:
            base[key] = hf
        elif not (key.startswith(PREFIX) and IGNORED_KEYS.fullmatch(key[len(PREFIX) :])):
            problems.append(f"unexpected tensor {key}")
    return _Index(moe, base, problems)


def read_reference(
    path: str | os.PathLike,
    config: LlamaConfig,
    moe: MoELoRAConfig,
    adapters: Sequence[LoRAAdapter],
    base_dir: str | os.PathLike,
) -> dict[ParamPath, np.ndarray]:
    """Reads a MeteoRA reference `model.safetensors` made with `adapters` (in that order).

    Returns our gates (Y, in, L) per targeted projection and, when the file holds stacked
    lora_A / lora_B, the adapter stacks lora_a (Y, L, in, R) / lora_b (Y, L, R, out) zero-padded
    to R = moe.rank (scales stay those of the adapters' configs). Raises ConfigError without
    adapters and CheckpointError naming the file and every tensor at fault.
    """
    path = os.fspath(path)
    names = [a.name for a in adapters]
    if not names:
        raise ConfigError(
            f"{path} is a MeteoRA reference checkpoint, which stores no adapter order or scalings: "
            "pass adapters= (the PEFT folders, in the order used to train it)"
        )
    if tuple(names) != moe.adapter_names:
        raise ConfigError(f"adapters {names} do not match the mixture's {list(moe.adapter_names)}")
    if not os.path.isfile(path):
        raise MissingFileError(f"MeteoRA reference checkpoint {path} does not exist")
    file = SafetensorsFile(path)
    index = _index(file, config.num_hidden_layers)
    if not index.moe:
        raise CheckpointError(
            f"{path}: holds no {PREFIX}...moe_gate.weight tensors, so it is not a MeteoRA checkpoint "
            f"(its first tensors: {', '.join(sorted(file.names())[:3]) or 'none'})"
        )
    problems = list(index.problems)
    untargeted = [p for p in PROJECTIONS if p not in moe.targets and any(q == p for _, q in index.moe)]
    if untargeted:
        problems.append(
            f"it has gates / LoRA weights for {', '.join(untargeted)}, which none of the given adapters "
            f"({', '.join(names)}) targets (they target {', '.join(moe.targets)}): was it trained with "
            "other adapters?"
        )
    out, gate_problems = _read_gates(file, index, config, moe, names)
    problems += gate_problems
    if any(part != GATE.part for part, _ in index.moe):
        stacks, lora_problems = _read_lora(file, index, config, moe, adapters)
        out.update(stacks)
        problems += lora_problems
    problems += _compare_base(file, index.base, config, os.fspath(base_dir))
    raise_problems(CheckpointError, path, problems)
    return out


def _float_problem(file: SafetensorsFile, key: str) -> list[str]:
    dtype = file.dtype(key)
    return [] if dtype in FLOAT_DTYPES else [f"tensor {key} has dtype {dtype}, expected a float type"]


def _read_gates(file, index: _Index, config: LlamaConfig, moe: MoELoRAConfig, names: list[str]):
    """Gates (Y, in, L) per targeted projection, and the problems found."""
    n, y = len(names), config.num_hidden_layers
    problems, out, found_l = [], {}, []
    for proj in moe.targets:
        d_in, _ = projection_shape(config, proj)
        keys = index.moe.get((GATE.part, proj), {})
        gate = np.zeros((y, d_in, n), np.float32)
        for layer in range(y):
            key = GATE.key(layer, proj)
            if layer not in keys:
                problems.append(f"missing gate {key} (every targeted projection of every layer needs one)")
                continue
            shape = file.shape(key)
            if len(shape) == 2 and shape[1] == d_in and shape[0] != n:
                found_l.append((shape[0], key, shape))
            elif shape != (n, d_in):
                problems.append(
                    f"tensor {key} has shape {shape}, expected {(n, d_in)} ({n} adapters x {d_in} in)"
                )
            else:
                problems += _float_problem(file, key)
                gate[layer] = GATE.to_ours(np.asarray(file.get(key), np.float32), n, 0)
        out[param_path(proj, GATE.leaf)] = gate
    if found_l:
        counts = sorted({f[0] for f in found_l})
        _, key, shape = found_l[0]
        problems.insert(
            0,
            f"it holds gates for {' / '.join(map(str, counts))} adapters (e.g. tensor {key} has shape "
            f"{shape}, expected {(n, shape[1])}), but {n} adapters were given ({', '.join(names)})",
        )
    return out, problems


def _read_lora(file, index: _Index, config: LlamaConfig, moe: MoELoRAConfig, adapters: Sequence[LoRAAdapter]):
    """Stacked lora_a / lora_b from the file's lora_A / lora_B, and the problems found."""
    n, y, rank = len(adapters), config.num_hidden_layers, moe.rank
    problems, out = [], {}
    for proj in moe.targets:
        d_in, d_out = projection_shape(config, proj)
        a_stack = np.zeros((y, n, d_in, rank), np.float32)
        b_stack = np.zeros((y, n, rank, d_out), np.float32)
        for layer in range(y):
            keys = {p.part: index.moe.get((p.part, proj), {}).get(layer) for p in (LORA_A, LORA_B)}
            missing = [MOE_PARTS[p].key(layer, proj) for p, k in keys.items() if k is None]
            if missing:
                problems += [
                    f"missing tensor {k} (the file has stacked LoRA weights elsewhere)" for k in missing
                ]
                continue
            key_a, key_b = keys[LORA_A.part], keys[LORA_B.part]
            shape_a, shape_b = file.shape(key_a), file.shape(key_b)
            r = shape_a[0] // n if len(shape_a) == 2 and shape_a[0] % n == 0 else 0
            bad = _float_problem(file, key_a) + _float_problem(file, key_b)
            if not r or (shape_a, shape_b) != (
                LORA_A.file_shape(n, r, d_in, d_out),
                LORA_B.file_shape(n, r, d_in, d_out),
            ):
                bad.append(
                    f"tensors {key_a} {shape_a} / {key_b} {shape_b} do not hold {n} adapters of one rank r: "
                    f"expected ({n}*r, {d_in}) / ({d_out}, {n}*r)"
                )
            elif r > rank:
                bad.append(
                    f"tensor {key_a} has rank {r} per adapter, more than the adapters' largest rank {rank}"
                )
            if bad:
                problems += bad
                continue
            a = LORA_A.to_ours(np.asarray(file.get(key_a), np.float32), n, r)  # (L, in, r)
            b = LORA_B.to_ours(np.asarray(file.get(key_b), np.float32), n, r)  # (L, r, out)
            for i, adapter in enumerate(adapters):
                module = adapter.modules.get((layer, proj))
                own = module.rank if module is not None else 0
                if own > r:
                    problems.append(
                        f"tensors {key_a} / {key_b} hold rank {r} per adapter, but adapter {adapter.name!r} "
                        f"has rank {own} there"
                    )
                elif np.any(a[i, :, own:]) or np.any(b[i, own:, :]):
                    where = f"beyond its rank {own}" if own else "although it does not adapt this module"
                    problems.append(
                        f"tensors {key_a} / {key_b}: block {i} (adapter {adapter.name!r}) is nonzero {where}"
                    )
            a_stack[layer, :, :, :r], b_stack[layer, :, :r, :] = a, b
        out[param_path(proj, LORA_A.leaf)] = a_stack
        out[param_path(proj, LORA_B.leaf)] = b_stack
    return out, problems


def _compare_base(file: SafetensorsFile, base_keys: Mapping[str, str], config: LlamaConfig, base_dir: str):
    """Problems for every base tensor of the file that differs from the base folder's."""
    if not base_keys:
        return []
    files = weight_files(base_dir)
    problems = []
    for key, hf in tqdm(sorted(base_keys.items()), desc="checking base weights", unit="tensor", disable=None):
        source = hf
        if hf not in files and hf == "lm_head.weight" and config.tie_word_embeddings:
            source = "model.embed_tokens.weight"
        if source not in files:
            problems.append(f"tensor {key} has no counterpart {hf} in {base_dir}")
            continue
        got, want = file.get(key), files[source].get(source)
        if got.shape != want.shape:
            problems.append(
                f"tensor {key} has shape {got.shape}, but {source} in {base_dir} has {want.shape}"
            )
            continue
        diff = max_abs_difference(got, want)
        if diff != 0:
            problems.append(
                f"tensor {key} differs from {source} in {base_dir} (max abs difference {diff:.3g}): "
                "the file was made on another base model"
            )
    return problems


def max_abs_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want| (inf where exactly one is NaN), with `want` rounded to got's dtype.

    Read in chunks, so memory-mapped tensors of any size are compared in bounded memory.
    """
    flat_got, flat_want = got.reshape(-1), want.reshape(-1)
    bitwise = got.dtype == want.dtype
    worst = 0.0
    for start in range(0, flat_got.size, _CHUNK):
        g, w = flat_got[start : start + _CHUNK], flat_want[start : start + _CHUNK]
        if bitwise and np.array_equal(g.view(np.uint8), w.view(np.uint8)):
            continue  # the common case, at memory speed
        g, w = g.astype(np.float64), w.astype(got.dtype).astype(np.float64)
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        if not same.all():
            worst = max(worst, float(np.max(np.nan_to_num(np.abs(g[~same] - w[~same]), nan=np.inf))))
    return worst


# ----------------------------------------------------------------------------- writing


def write_reference(
    model, base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False
) -> str:
    """Writes a fused `MeteoRAModel` in the reference format: `out_dir/model.safetensors` (the whole
    PEFT-wrapped state dict, base tensors copied bit for bit from `base_dir`, MeteoRA tensors in
    float32) and `out_dir/adapter_order.json`. See `write_reference_params`.
    """
    if model.moe is None:
        raise ConfigError("this model has no adapters: there is no MeteoRA checkpoint to write")
    return write_reference_params(
        model_params(model.module), model.moe, model.adapter_info, base_dir, out_dir, force=force
    )


def write_reference_params(
    params: Mapping[ParamPath, object],
    moe: MoELoRAConfig,
    infos: Sequence[AdapterInfo],
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
) -> str:
    """Writes MeteoRA parameters (by path, as `model_params` gives) in the reference format.

    The reference needs one rank: adapters of smaller rank are zero-padded to `moe.rank` (exact),
    and `adapter_order.json` records the order, each adapter's true ranks / alphas / rsLoRA /
    source, and the padding. `out_dir` is built next to itself and renamed into place; an
    existing one is refused unless `force`.
    """
    base_dir = os.fspath(base_dir)
    config = LlamaConfig.from_hf(base_dir)
    infos = tuple(infos)
    if tuple(i.name for i in infos) != moe.adapter_names:
        raise ConfigError(f"adapter infos {[i.name for i in infos]} do not match {list(moe.adapter_names)}")
    shapes = expected_shapes(moe, config)
    wrong = [
        f"{'/'.join(p)} {tuple(np.shape(params.get(p)))} vs {s}"
        for p, s in shapes.items()
        if p not in params or tuple(np.shape(params[p])) != s
    ]
    raise_problems(ConfigError, f"MeteoRA parameters do not fit {base_dir}", wrong)
    files = weight_files(base_dir)
    # Base tensors as memory-mapped views: save_file reads each only while writing it.
    tensors = {
        reference_base_key(k, moe.targets): files[k].get(k) for k in files if not IGNORED_KEYS.fullmatch(k)
    }
    for proj in moe.targets:
        for part in MOE_PARTS.values():
            stack = np.asarray(jax.device_get(params[param_path(proj, part.leaf)]), np.float32)
            for layer in range(config.num_hidden_layers):
                tensors[part.key(layer, proj)] = part.to_file(stack[layer])
    order = _order_json(moe, infos, base_dir)
    with staged_directory(out_dir, force=force) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), progress=True)
        write_text_atomic(os.path.join(tmp, ORDER_FILE), json.dumps(order, indent=2))
    return os.path.abspath(os.fspath(out_dir))


def _order_json(moe: MoELoRAConfig, infos: Sequence[AdapterInfo], base_dir: str) -> dict:
    adapters = []
    for info in infos:
        alphas = sorted(set(info.alphas.values()))
        adapters.append(
            {
                "name": info.name,
                "source": info.source,
                "rank": max(info.ranks.values()),
                "alpha": alphas[0] if len(alphas) == 1 else None,
                "use_rslora": info.use_rslora,
                "modules": info.to_json()["modules"],
            }
        )
    padded = any(r != moe.rank for info in infos for r in info.ranks.values())
    return {
        "format": "meteora-torch",
        "adapter_order": list(moe.adapter_names),
        "rank": moe.rank,
        "padded": padded,
        "note": (
            f"lora_A / lora_B hold {moe.rank} rows / columns per adapter; adapters of smaller rank are "
            "zero-padded (see each adapter's modules for its true ranks)"
            if padded
            else f"all adapters have rank {moe.rank}"
        ),
        "targets": list(moe.targets),
        "top_k": moe.top_k,
        "temperature": moe.temperature,
        "base": {"path": os.path.abspath(base_dir), "fingerprint": base_fingerprint(base_dir)},
        "adapters": adapters,
    }
