"""Safe output writing (`meteora_jax.io.files`): staged folders, atomic files, problem lists,
and the writers built on them (`save_llama`, the safetensors writer)."""

from __future__ import annotations

import errno
import logging
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
import safetensors
from flax import nnx

from meteora_jax.config import LlamaConfig
from meteora_jax.errors import CheckpointError, describe_os_error, storage_error
from meteora_jax.io import files
from meteora_jax.io.files import raise_problems, staged_directory, write_bytes_atomic, write_text_atomic
from meteora_jax.io.hf import load_llama, save_llama
from meteora_jax.io.safetensors_io import SafetensorsFile, save_file
from meteora_jax.modeling.llama import LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=31,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


def leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def fail_final_rename(monkeypatch, out_dir, also_move_back: bool = False):
    """Makes `os.replace` fail for the rename of a staged folder onto `out_dir` (only that one)."""
    real = os.replace
    out_dir = os.path.abspath(out_dir)
    name = os.path.basename(out_dir)

    def replace(src, dst, *args, **kwargs):
        src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
        staged = os.path.basename(src).startswith(f".{name}.tmp-") and os.path.isdir(src)
        moving_back = os.path.basename(os.path.dirname(src)).startswith(f".{name}.old-")
        if dst == out_dir and (staged or (also_move_back and moving_back)):
            raise OSError("injected rename failure")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    return out


# ----------------------------------------------------------------------------- staged_directory


def test_staged_directory_creates_and_replaces(tmp_path):
    out = tmp_path / "out"
    with staged_directory(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not out.exists()
        pathlib.Path(tmp, "a.txt").touch()
    assert os.listdir(out) == ["a.txt"] and not leftovers(tmp_path)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o755)

    with pytest.raises(FileExistsError, match=f"{out} already exists.*force"), staged_directory(out):
        raise AssertionError("not reached: refused on entry")
    with staged_directory(out, force=True) as tmp:
        pathlib.Path(tmp, "b.txt").touch()
    assert os.listdir(out) == ["b.txt"] and not leftovers(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_directory(empty) as tmp:  # an empty folder is no output to protect
        pathlib.Path(tmp, "c.txt").touch()
    assert os.listdir(empty) == ["c.txt"] and not leftovers(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_staged_directory_exception_leaves_nothing(tmp_path, existing):
    out = old_folder(tmp_path) if existing else tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_directory(out, force=True) as tmp:
        pathlib.Path(tmp, "half.txt").touch()
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == (["out"] if existing else [])
    if existing:
        assert (out / "keep.txt").read_text() == "old"


def test_staged_directory_failed_final_rename_keeps_old(tmp_path, monkeypatch):
    out = old_folder(tmp_path)
    fail_final_rename(monkeypatch, out)
    with pytest.raises(OSError, match="injected"), staged_directory(out, force=True) as tmp:
        pathlib.Path(tmp, "new.txt").touch()
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"], "no temporary or trash folders are left"


def test_staged_directory_replaces_a_file_and_restores_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.write_text("a file")
    fail_final_rename(monkeypatch, out)
    with pytest.raises(OSError, match="injected"), staged_directory(out, force=True):
        pass
    assert out.read_text() == "a file" and os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()
    with staged_directory(out, force=True) as tmp:
        pathlib.Path(tmp, "x").touch()
    assert os.listdir(out) == ["x"] and not leftovers(tmp_path)


def test_staged_directory_keeps_old_when_it_cannot_be_moved_back(tmp_path, monkeypatch):
    out = old_folder(tmp_path)
    fail_final_rename(monkeypatch, out, also_move_back=True)
    with pytest.raises(OSError, match="injected") as info, staged_directory(out, force=True):
        pass
    (trash,) = leftovers(tmp_path)
    kept = tmp_path / trash / "old"
    assert (kept / "keep.txt").read_text() == "old", "the old output is never deleted before the swap"
    assert any(str(kept) in note for note in info.value.__notes__)


def test_staged_directory_does_not_clobber_a_name_taken_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists"), staged_directory(out) as tmp:
        pathlib.Path(tmp, "mine").touch()
        out.mkdir()
        (out / "theirs").write_text("someone else's")
    assert os.listdir(out) == ["theirs"] and os.listdir(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- single files


def test_write_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two" and oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    write_text_atomic(tmp_path / "t.json", '{"é": 1}')
    assert (tmp_path / "t.json").read_bytes() == '{"é": 1}'.encode()
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "t.json"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_write_bytes_atomic_failure_leaves_no_temp_file(tmp_path, monkeypatch, step):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(os, step, broken)
    with pytest.raises(OSError, match="injected"):
        write_bytes_atomic(path, b"new")
    assert os.listdir(tmp_path) == ["f.bin"] and path.read_bytes() == b"old"
    with pytest.raises(OSError, match="injected"):
        write_bytes_atomic(tmp_path / "fresh.bin", b"new")
    assert os.listdir(tmp_path) == ["f.bin"]


def test_save_file_streams_a_valid_safetensors_file(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "b.t": base.T,  # not contiguous
        "a.int": np.arange(6, dtype=np.int64).reshape(2, 3),
        "c.empty": np.zeros((0, 4), np.float16),
        "d.mask": np.array([True, False]),
        "e.bf16": base.astype(ml_dtypes.bfloat16),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    ours = SafetensorsFile(os.fspath(path))
    assert ours.metadata == {"format": "pt", "note": "hi"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours.get(name), value)
        assert ours.dtype(name) == value.dtype
    with safetensors.safe_open(os.fspath(path), "np") as f:  # the reference reader (no bfloat16 in numpy)
        assert f.metadata() == {"format": "pt", "note": "hi"}
        for name in ("a.int", "b.t", "c.empty", "d.mask"):
            np.testing.assert_array_equal(f.get_tensor(name), tensors[name])
    assert os.listdir(tmp_path) == ["x.safetensors"]
    with pytest.raises(ValueError, match="cannot be stored"):
        save_file({"c": np.zeros(2, np.complex64)}, tmp_path / "y.safetensors")
    assert os.listdir(tmp_path) == ["x.safetensors"]


# ----------------------------------------------------------------------------- save_llama


def tiny_model() -> LlamaForCausalLM:
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))


def test_save_llama_refuses_a_folder_with_unrelated_files(tmp_path):
    out = old_folder(tmp_path)
    with pytest.raises(FileExistsError, match=f"{out}.*overwrite=True"):
        save_llama(tiny_model(), out)
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_llama(tiny_model(), empty)


def test_save_llama_overwrite_keeps_old_folder_when_final_rename_fails(tmp_path, monkeypatch):
    out = old_folder(tmp_path)
    model = tiny_model()
    fail_final_rename(monkeypatch, out)
    with pytest.raises(OSError, match="injected"):
        save_llama(model, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"], "no temporary or trash folders are left"
    monkeypatch.undo()
    save_llama(model, out, overwrite=True, max_shard_bytes=2000)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)
    assert os.listdir(tmp_path) == ["out"]
    loaded = load_llama(os.fspath(out))
    np.testing.assert_array_equal(np.asarray(loaded.embed_tokens[...]), np.asarray(model.embed_tokens[...]))


# ----------------------------------------------------------------------------- raise_problems


def test_raise_problems_message_shape():
    raise_problems(CheckpointError, "nowhere", [])  # nothing to report: no error
    with pytest.raises(CheckpointError) as info:
        raise_problems(CheckpointError, "f.safetensors", ["a", "b", "c"])
    assert str(info.value) == "f.safetensors: a; b; c"
    problems = [f"p{i}" for i in range(20)]
    with pytest.raises(ValueError) as info:
        raise_problems(ValueError, "where", problems)
    assert str(info.value) == "where: " + "; ".join(problems[:12]) + "; and 8 more"
    with pytest.raises(ValueError, match=r"^where: p0; p1; p2; and 17 more$"):
        files.raise_problems(ValueError, "where", problems, max_shown=3)


def test_a_refused_temporary_twin_names_the_output_asked_for(tmp_path, monkeypatch):
    """Creating the hidden temporary file / folder fails (read-only, no permission): the error
    names the user's path, never the temporary one."""

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.tmp-x1y2"))

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    monkeypatch.setattr(files.tempfile, "mkdtemp", denied)
    with pytest.raises(PermissionError) as info:
        files.write_text_atomic(tmp_path / "out.json", "{}")
    assert info.value.filename == str(tmp_path / "out.json")
    with pytest.raises(PermissionError) as info, files.staged_directory(tmp_path / "folder"):
        pass
    assert info.value.filename == str(tmp_path / "folder") and not os.listdir(tmp_path)


def test_a_write_that_fails_without_naming_a_file_names_the_output(tmp_path):
    """A failed write or flush (ENOSPC) names no file: the error names the user's path, and the
    temporary file is gone."""
    with pytest.raises(OSError) as info, files.atomic_file(tmp_path / "out.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "out.json") and info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_storage_errors_are_found_behind_library_wrappers():
    """A full disk or read-only file system behind another error, or in tensorstore's status
    text (how Orbax reports a failed write), is recognised with its path; others are not."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/run/8/opt")
    except OSError as e:
        wrapped = RuntimeError("save failed")
        wrapped.__cause__ = e
    assert storage_error(wrapped).filename == "/run/8/opt"
    text = 'RESOURCE_EXHAUSTED: Error writing local file "/run/4/x": Failed writing: "/run/4/x.__lock": ' + (
        "Failed to write 5576 bytes to file 6: No space left on device [os_error_code='28']"
    )
    found = storage_error(ValueError(text))
    assert (found.errno, found.filename) == (errno.ENOSPC, "/run/4/x.__lock")
    assert describe_os_error(found) == "/run/4/x.__lock: No space left on device"
    assert storage_error(ValueError("os_error_code='2'")) is None and storage_error(KeyError("x")) is None


def test_orbax_reports_of_a_storage_failure_are_dropped_during_a_run(caplog):
    """While a run lives, absl records of a full-disk write (the run says it once itself) are
    dropped; other records still pass, and after the run nothing is filtered."""
    from meteora_jax.io.checkpoint import storage_failures_reported_once

    logger = logging.getLogger("absl")
    full = "RESOURCE_EXHAUSTED: Failed writing: \"/r/4/x\": No space left on device [os_error_code='28']"
    with caplog.at_level(logging.ERROR, logger="absl"):
        with storage_failures_reported_once():
            logger.error("_SignalingThread.run() raised an exception: %s", full)
            logger.error("something else went wrong")
        logger.error("after the run: %s", full)
    assert [r.getMessage()[:20] for r in caplog.records] == ["something else went ", "after the run: RESOU"]
    caplog.clear()
    # asyncio reports an unawaited write task when it is collected, after the run: still dropped.
    failed = ValueError(full)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=failed)
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=KeyError("x"))
    assert [type(r.exc_info[1]) for r in caplog.records] == [KeyError]
