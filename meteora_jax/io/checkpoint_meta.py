"""What a meteora-jax checkpoint says about itself: its metadata and the base model it was built on.

`CheckpointMeta` is a step's `meta` item (format version, adapters, targets, rank, routing
defaults, the base's config and fingerprint); `base_fingerprint` tells apart base models cheaply;
`check_base` refuses a base folder other than the one a checkpoint was made on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from meteora_jax.config import LlamaConfig, MoELoRAConfig
from meteora_jax.errors import CheckpointError, ConfigError
from meteora_jax.inputs import is_int, is_real
from meteora_jax.io.hf import CONFIG_FILE, IGNORED_KEYS, weight_files
from meteora_jax.io.stacking import AdapterInfo

FORMAT = "meteora-jax"
VERSION = 2  # 2: array checksums in the metadata
# Fingerprint sampling: this many windows of this many bytes, evenly spread over each tensor.
SAMPLES, SAMPLE_BYTES = 16, 256


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step is damaged: unreadable, truncated or missing files, metadata that is not
    JSON, arrays that fail their checksums or disagree with the metadata. The previous step may
    still be good (`restore_latest_good`)."""


# ----------------------------------------------------------------------------- base fingerprint


def base_fingerprint(base_dir: str | os.PathLike) -> str:
    """A fingerprint of a HF LLaMA folder's model, cheap even for a 16 GB checkpoint.

    sha256 over: the parsed model fields of `config.json` (`LlamaConfig.to_hf_dict()`, so
    cosmetic fields such as `transformers_version` do not count); then, for every tensor in
    name order, its name, shape, dtype and `SAMPLES` windows of `SAMPLE_BYTES` bytes spread
    evenly over its data (first and last bytes included; small tensors are hashed whole), read
    through the memory-mapped files, so only ~4 KB per tensor is touched. It does not depend on
    how the weights are sharded over files. It tells apart different models, dtypes and
    fine-tunes (which change every byte); an edit of a few scattered elements may escape it.
    """
    return _fingerprint(os.fspath(base_dir))[0]


def _fingerprint(base_dir: str) -> tuple[str, dict]:
    """(fingerprint, a human summary: tensor count, dtypes, total bytes)."""
    config = LlamaConfig.from_hf(base_dir)
    files = weight_files(base_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
    names = sorted(n for n in files if not IGNORED_KEYS.fullmatch(n))
    dtypes, total = set(), 0
    for name in names:
        file = files[name]
        dtype, shape = file.dtype(name), file.shape(name)
        dtypes.add(str(dtype))
        digest.update(json.dumps([name, list(shape), str(dtype)]).encode())
        raw = np.ascontiguousarray(file.get(name)).reshape(-1).view(np.uint8)
        total += raw.size
        if raw.size <= SAMPLES * SAMPLE_BYTES:
            digest.update(raw.tobytes())
        else:
            for start in np.linspace(0, raw.size - SAMPLE_BYTES, SAMPLES).astype(np.int64):
                digest.update(raw[start : start + SAMPLE_BYTES].tobytes())
    summary = {"tensors": len(names), "dtypes": sorted(dtypes), "bytes": int(total)}
    return f"sha256:{digest.hexdigest()}", summary


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint must say about itself besides the arrays (its `meta` item)."""

    adapters: tuple[AdapterInfo, ...]
    targets: tuple[str, ...]
    rank: int
    top_k: int
    temperature: float
    dropout: float
    base_config: LlamaConfig
    base_path: str | None
    base_fingerprint: str
    base_summary: dict = dataclasses.field(default_factory=dict)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def moe(self, top_k: int | None = None, temperature: float | None = None) -> MoELoRAConfig:
        """The mixture config; top_k / temperature None means the stored defaults."""
        return MoELoRAConfig(
            adapter_names=self.adapter_names,
            targets=self.targets,
            rank=self.rank,
            top_k=self.top_k if top_k is None else top_k,
            temperature=self.temperature if temperature is None else temperature,
            dropout=self.dropout,
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "adapter_names": list(self.adapter_names),
            "adapters": [a.to_json() for a in self.adapters],
            "targets": list(self.targets),
            "rank": self.rank,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "dropout": self.dropout,
            "base": {
                "config": self.base_config.to_hf_dict(),
                "path": self.base_path,
                "fingerprint": self.base_fingerprint,
                **self.base_summary,
            },
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> CheckpointMeta:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(
                f"{where}: not a {FORMAT} checkpoint (its metadata has no format {FORMAT!r})"
            )
        if data.get("version") != VERSION:
            old = (
                " (written before array checksums existed: convert it again)"
                if data.get("version") == 1
                else ""
            )
            raise CheckpointError(
                f"{where}: checkpoint format version {data.get('version')!r} is not supported "
                f"(this meteora-jax reads version {VERSION}){old}"
            )
        try:
            meta = cls._from_fields(data)
            meta.moe()  # names, targets, rank and routing defaults must make a valid mixture
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CorruptCheckpointError(
                f"{where}: malformed checkpoint metadata ({type(e).__name__}: {e})"
            ) from None
        return meta

    @classmethod
    def _from_fields(cls, data: dict) -> CheckpointMeta:
        """The metadata from its JSON fields; KeyError / TypeError / ValueError naming a bad one."""
        base, adapters = data["base"], data["adapters"]
        if not isinstance(base, dict) or not isinstance(adapters, list):
            raise TypeError("base must be an object and adapters a list")
        infos = tuple(AdapterInfo.from_json(a) for a in adapters)
        if [a.name for a in infos] != data["adapter_names"]:
            raise ValueError("adapter_names and adapters disagree")
        for key, valid in (
            ("rank", is_int),
            ("top_k", is_int),
            ("temperature", is_real),
            ("dropout", is_real),
        ):
            if not valid(data.get(key, 0.0)):
                raise TypeError(f"{key} is {data.get(key)!r}")
        targets, path, fingerprint = data["targets"], base.get("path"), base["fingerprint"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a list of projection names, got {targets!r}")
        if not isinstance(fingerprint, str) or not (path is None or isinstance(path, str)):
            raise TypeError("base fingerprint and path must be strings")
        return cls(
            adapters=infos,
            targets=tuple(targets),
            rank=data["rank"],
            top_k=data["top_k"],
            temperature=float(data["temperature"]),
            dropout=float(data.get("dropout", 0.0)),
            base_config=LlamaConfig.from_hf(base["config"]),
            base_path=path,
            base_fingerprint=fingerprint,
            base_summary={k: base[k] for k in ("tensors", "dtypes", "bytes") if k in base},
        )


def make_meta(moe: MoELoRAConfig, infos, base_dir: str) -> CheckpointMeta:
    """The metadata of a model over `base_dir` (computes the base fingerprint)."""
    infos = tuple(infos)
    if tuple(i.name for i in infos) != moe.adapter_names:
        raise ConfigError(
            f"adapter infos {[i.name for i in infos]} do not match the model's adapters "
            f"{list(moe.adapter_names)}"
        )
    fingerprint, summary = _fingerprint(base_dir)
    return CheckpointMeta(
        adapters=infos,
        targets=moe.targets,
        rank=moe.rank,
        top_k=moe.top_k,
        temperature=float(moe.temperature),
        dropout=float(moe.dropout),
        base_config=LlamaConfig.from_hf(base_dir),
        base_path=os.path.abspath(base_dir),
        base_fingerprint=fingerprint,
        base_summary=summary,
    )


def check_base(
    meta: CheckpointMeta, base_dir: str | os.PathLike, where: str, config: LlamaConfig | None = None
) -> None:
    """Refuses a base folder whose config or weights differ from the checkpoint's base.

    config: the base folder's, when the caller has already read it.
    """
    base_dir = os.fspath(base_dir)
    config = LlamaConfig.from_hf(base_dir) if config is None else config
    built_on = f"checkpoint {where} was built on the base {meta.base_path}"
    if config != meta.base_config:
        diffs = [
            f"{f.name} {getattr(meta.base_config, f.name)!r} vs {getattr(config, f.name)!r}"
            for f in dataclasses.fields(LlamaConfig)
            if getattr(meta.base_config, f.name) != getattr(config, f.name)
        ]
        raise CheckpointError(
            f"{built_on}, whose {CONFIG_FILE} differs from {base_dir}'s: {'; '.join(diffs)} "
            "(checkpoint vs given base)"
        )
    fingerprint, summary = _fingerprint(base_dir)
    if fingerprint != meta.base_fingerprint:
        raise CheckpointError(
            f"{built_on} (fingerprint {meta.base_fingerprint}, {_describe(meta.base_summary)}), but the "
            f"weights in {base_dir} differ (fingerprint {fingerprint}, {_describe(summary)}): "
            "load it with the base it was made for"
        )


def _describe(summary: dict) -> str:
    if not summary:
        return "no summary"
    dtypes = "/".join(summary.get("dtypes", []))
    return f"{summary.get('tensors')} tensors, {dtypes}, {summary.get('bytes')} bytes"
