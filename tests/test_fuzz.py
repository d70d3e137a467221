"""Fuzzing the files a user hands us: every corruption ends in a MeteoRAError, or loads.

Random corruptions (byte flips, truncations, a JSON value replaced by random JSON) of a
safetensors header, an `adapter_config.json`, a `config.json` and checkpoint metadata are fed
to what users run on them: `load_model` and a conversion to a checkpoint (`convert`'s path:
`fuse` + `write_checkpoint`). Each must refuse with a `MeteoRAError` (never another exception
type, never a hang: every example runs under an alarm) or succeed where the corruption is
harmless, and a failed conversion must leave nothing in the output location. Deterministic
(`derandomize=True`) and small: the whole file runs in well under a minute on one core.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
import warnings

import pytest
from conftest import make_hf_model, make_peft_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meteora_jax as mj
from meteora_jax.errors import MeteoRAError
from meteora_jax.io import checkpoint, gate_sources

EXAMPLES = 100  # per target; an example loads and converts a tiny model (0.02 to 0.3 s)
SECONDS_PER_EXAMPLE = 30  # a bound far above the normal time: reaching it means a hang
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON_BYTES = b'0123456789{}[]":,.-+eE tfrunalsNI\\'
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    _, base = make_hf_model(root / "base")
    adapter = make_peft_adapter(base, root / "adapter", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mj.load_model(base, adapters={"a": adapter})
    ckpt = checkpoint.save_checkpoint(root / "ckpt", model, base)
    return dict(base=base, adapter=adapter, ckpt=ckpt)


# ----------------------------------------------------------------------------- corruptions


def _json_paths(value, prefix=()):
    """Every path into a parsed JSON document (the root included)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _json_paths(child, (*prefix, key))


def _replace(doc, path, new):
    if not path:
        return new
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return doc


@st.composite
def json_edit(draw, doc):
    """A copy of `doc` with the value at one random path replaced by random JSON."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from(list(_json_paths(doc))))
    return _replace(doc, path, draw(JSON_VALUES))


@st.composite
def byte_edit(draw, raw: bytes, limit: int | None = None):
    """`raw` with a few bytes flipped (within the first `limit` bytes), or truncated."""
    if draw(st.booleans()):
        return raw[: draw(st.integers(0, len(raw) - 1))]
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        # Mostly bytes JSON gives meaning to (a random byte is nearly always invalid UTF-8).
        out[draw(st.integers(0, (limit or len(raw)) - 1))] = draw(
            st.sampled_from(JSON_BYTES) | st.integers(0, 255)
        )
    return bytes(out)


def json_file_corruption(raw: bytes):
    return st.one_of(byte_edit(raw), json_edit(json.loads(raw)).map(lambda d: json.dumps(d).encode()))


def safetensors_corruption(raw: bytes):
    """Flips inside the header, truncations, or the header JSON edited (its length field kept
    right, or left stale)."""
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]

    def rebuild(edit):
        doc, stale = edit
        text = json.dumps(doc).encode()
        return struct.pack("<Q", length if stale else len(text)) + text + data

    return st.one_of(
        byte_edit(raw, limit=8 + length), st.tuples(json_edit(header), st.booleans()).map(rebuild)
    )


# ----------------------------------------------------------------------------- the checks


@contextlib.contextmanager
def time_bound(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"a corrupted input made the example run past {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused_or_done(action) -> bool:
    """True when `action` succeeds, False when it raises a MeteoRAError; anything else fails."""
    try:
        action()
    except MeteoRAError:
        return False
    return True


def convert(base, adapters, out, gates=None) -> None:
    """`meteora-jax convert` without the command line: fuse, then write the checkpoint."""
    moe, params, infos = gate_sources.fuse(base, adapters, gates)
    checkpoint.write_checkpoint(out, params, moe, infos, base)


def check_output(out: str, converted: bool) -> None:
    parent = os.path.dirname(out)
    leftovers = [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]
    assert not leftovers, f"files left behind next to the output: {leftovers}"
    if converted:
        assert checkpoint.checkpoint_steps(out) == [0]
    else:
        assert not os.path.exists(out), "a refused conversion left its output"


def run_case(world, corrupt_rel: str, content: bytes, *, use_ckpt: bool = False) -> tuple[bool, bool]:
    """Copies the inputs, writes `content` over one of them, then loads and converts; returns
    whether each was done (False: refused with a MeteoRAError)."""
    with tempfile.TemporaryDirectory() as work, time_bound(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = {
            name: shutil.copytree(world[name], os.path.join(work, name))
            for name in ("base", "adapter", "ckpt")
        }
        with open(os.path.join(work, corrupt_rel), "wb") as f:
            f.write(content)
        base, adapters = inputs["base"], {"a": inputs["adapter"]}
        out = os.path.join(work, "outputs", "converted")
        os.makedirs(os.path.dirname(out))
        if use_ckpt:
            loaded = refused_or_done(lambda: mj.load_model(base, gates=inputs["ckpt"]))
            converted = refused_or_done(lambda: convert(base, None, out, gates=inputs["ckpt"]))
        else:
            loaded = refused_or_done(lambda: mj.load_model(base, adapters=adapters))
            converted = refused_or_done(lambda: convert(base, adapters, out))
        check_output(out, converted)
        return loaded, converted


def _read(world, rel: str) -> bytes:
    root = os.path.dirname(world["base"])
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- the targets


@pytest.fixture(scope="module")
def originals(world):
    return {
        "safetensors": _read(world, "base/model.safetensors"),
        "config": _read(world, "base/config.json"),
        "adapter_config": _read(world, "adapter/adapter_config.json"),
        "meta": _read(world, "ckpt/0/meta/metadata"),
    }


def test_the_uncorrupted_inputs_load_and_convert(world, originals):
    """The positive control: the harness, fed the files as they are, loads and converts them (a
    harness that refused everything would pass every fuzz case)."""
    assert run_case(world, "base/config.json", originals["config"]) == (True, True)
    assert run_case(world, "ckpt/0/meta/metadata", originals["meta"], use_ckpt=True) == (True, True)


def test_fuzz_safetensors_header(world, originals):
    @FUZZ
    @given(content=safetensors_corruption(originals["safetensors"]))
    def case(content):
        run_case(world, "base/model.safetensors", content)

    case()


def test_fuzz_config_json(world, originals):
    @FUZZ
    @given(content=json_file_corruption(originals["config"]))
    def case(content):
        run_case(world, "base/config.json", content)

    case()


def test_fuzz_adapter_config_json(world, originals):
    @FUZZ
    @given(content=json_file_corruption(originals["adapter_config"]))
    def case(content):
        run_case(world, "adapter/adapter_config.json", content)

    case()


def test_fuzz_checkpoint_metadata(world, originals):
    @FUZZ
    @given(content=json_file_corruption(originals["meta"]))
    def case(content):
        run_case(world, "ckpt/0/meta/metadata", content, use_ckpt=True)

    case()
