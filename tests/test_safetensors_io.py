"""Our safetensors reader validates headers as the format requires, one violation per test.

Each broken file is built byte by byte; the reader must refuse it with a one-line
CheckpointError naming the file (and the tensor, where one is at fault). Where the reference
reader (the safetensors crate) also defines the rule, it is checked to refuse the file too, so
we are exactly as strict as the format.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import safetensors

from meteora_jax.errors import CheckpointError
from meteora_jax.io.safetensors_io import SafetensorsFile, save_file

A = np.arange(6, dtype=np.float32).reshape(2, 3)  # 24 bytes
B = np.arange(4, dtype=np.int16)  # 8 bytes


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


VALID = {"a": _entry("F32", [2, 3], 0, 24), "b": _entry("I16", [4], 24, 32)}
DATA = A.tobytes() + B.tobytes()


def _write(tmp_path, header, data: bytes = DATA, *, raw_len: int | None = None) -> str:
    """A file with `header` (a dict, or raw bytes) and `data`; raw_len overrides the length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if raw_len is None else raw_len) + text + data)
    return os.fspath(path)


def _refused(path: str, pattern: str, *, reference_refuses: bool = True) -> str:
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(pattern, message), message
    if reference_refuses:
        with pytest.raises(Exception):  # noqa: B017 (the crate raises its own SafetensorError)
            _reference_read(path)
    return message


def _reference_read(path: str) -> None:
    """Reads every tensor with the safetensors crate."""
    with safetensors.safe_open(path, "np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
            f.get_tensor(key)


def test_a_valid_hand_built_file_reads_back(tmp_path):
    path = _write(tmp_path, {"__metadata__": {"format": "pt"}, **VALID})
    _reference_read(path)
    file = SafetensorsFile(path)
    assert file.metadata == {"format": "pt"} and sorted(file.names()) == ["a", "b"]
    np.testing.assert_array_equal(file.get("a"), A)
    np.testing.assert_array_equal(file.get("b"), B)


def test_empty_tensors_and_header_padding_are_valid(tmp_path):
    header = json.dumps({"e": _entry("F16", [0, 4], 0, 0), **VALID}).encode() + b"    "
    file = SafetensorsFile(_write(tmp_path, header))
    assert file.get("e").shape == (0, 4)
    save_file({"x": np.zeros((0,), np.float32), "y": A}, tmp_path / "saved.safetensors")
    assert SafetensorsFile(os.fspath(tmp_path / "saved.safetensors")).shape("y") == (2, 3)


def test_too_short(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x01\x02")
    _refused(os.fspath(path), r"not a safetensors file \(too short: 2 bytes\)")


@pytest.mark.parametrize("length", [0, 1, 10**6, 2**64 - 1], ids=["zero", "one", "past-the-end", "huge"])
def test_header_length_must_fit_the_file(tmp_path, length):
    _refused(_write(tmp_path, VALID, raw_len=length), rf"bad header length {length} for a \d+-byte file")


def test_header_must_be_utf8_json(tmp_path):
    _refused(_write(tmp_path, b"{\xff\xfe}"), r"header is not JSON")
    _refused(_write(tmp_path, b'{"a": '), r"header is not JSON")


@pytest.mark.parametrize(
    "header", [b"[1, 2]", b'"text"', b' {"a": 1}'], ids=["list", "string", "leading-space"]
)
def test_header_must_be_an_object_starting_with_a_brace(tmp_path, header):
    _refused(_write(tmp_path, header, b""), r"header is not a JSON object starting with '\{'")


def test_duplicate_tensor_names(tmp_path):
    text = b'{"a": %s, "a": %s}' % (json.dumps(VALID["a"]).encode(), json.dumps(VALID["b"]).encode())
    _refused(_write(tmp_path, text), r"header is not JSON: key 'a' appears twice", reference_refuses=False)


def test_metadata_must_map_strings_to_strings(tmp_path):
    _refused(_write(tmp_path, {"__metadata__": {"format": 1}, **VALID}), r"__metadata__ must map strings")


def test_unknown_dtype(tmp_path):
    header = {**VALID, "a": _entry("F33", [2, 3], 0, 24)}
    _refused(_write(tmp_path, header), r"tensor 'a': dtype 'F33' is not one of F64, F32")


@pytest.mark.parametrize("shape", [[2, -3], [2.0, 3], [True, 6], "2x3", None], ids=str)
def test_shape_must_be_non_negative_integers(tmp_path, shape):
    header = {**VALID, "a": {**VALID["a"], "shape": shape}}
    _refused(_write(tmp_path, header), r"tensor 'a': shape .* is not a list of non-negative integers")


@pytest.mark.parametrize("offsets", [[0], [0, 24, 32], [-1, 23], [0, "24"]], ids=str)
def test_data_offsets_must_be_two_non_negative_integers(tmp_path, offsets):
    header = {**VALID, "a": {**VALID["a"], "data_offsets": offsets}}
    _refused(_write(tmp_path, header), r"tensor 'a': data_offsets .* are not two non-negative integers")


def test_entry_must_be_an_object(tmp_path):
    _refused(_write(tmp_path, {**VALID, "a": [1, 2]}), r"tensor 'a': entry \[1, 2\] is not an object")


def test_dtype_times_shape_must_equal_the_byte_length(tmp_path):
    header = {**VALID, "a": _entry("F32", [2, 4], 0, 24)}
    _refused(_write(tmp_path, header), r"tensor 'a': dtype F32 x shape \[2, 4\] is 32 bytes, but .* hold 24")


def test_reversed_offsets_are_refused(tmp_path):
    header = {**VALID, "a": _entry("F32", [0], 24, 0)}
    _refused(_write(tmp_path, header), r"tensor 'a': dtype F32 x shape \[0\] is 0 bytes, but .*\[24, 0\]")


def test_overlapping_tensors(tmp_path):
    header = {"a": _entry("F32", [2, 3], 0, 24), "b": _entry("I16", [4], 16, 24)}
    _refused(_write(tmp_path, header, DATA[:24]), r"tensors 'a' and 'b' overlap \(bytes 16 to 24\)")


def test_a_gap_between_tensors(tmp_path):
    header = {"a": _entry("F32", [2, 3], 0, 24), "b": _entry("I16", [4], 28, 36)}
    message = _refused(_write(tmp_path, header, DATA + b"\0" * 4), r"tensor 'b' starts at byte 28")
    assert "after tensor 'a' unused (tensors must be contiguous)" in message


def test_data_must_start_at_zero(tmp_path):
    header = {"a": _entry("F32", [2, 3], 8, 32)}
    _refused(
        _write(tmp_path, header, DATA), r"tensor 'a' starts at byte 8, leaving bytes 0 to 8 at the start"
    )


def test_truncated_data(tmp_path):
    _refused(_write(tmp_path, VALID, DATA[:-3]), r"tensor 'b' points outside the file .*holds 29 data bytes")


def test_trailing_bytes_no_tensor_covers(tmp_path):
    _refused(_write(tmp_path, VALID, DATA + b"extra"), r"the tensors end at byte 32 .* holds 37 data bytes")


def test_no_tensors_but_data(tmp_path):
    _refused(_write(tmp_path, {}, b"junk"), r"the tensors end at byte 0 .* holds 4 data bytes")
