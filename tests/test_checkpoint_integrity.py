"""Checkpoint integrity: checksums of every saved array, metadata checked against the arrays,
one-line errors for damaged files, and the fallback to the last good step.

Each test breaks a private copy of one small checkpoint (two adapters of different ranks and
alphas, so metadata naming them in another order cannot match the arrays).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import make_hf_model, make_peft_adapter

import meteora_jax as mj
from meteora_jax.errors import CheckpointError
from meteora_jax.io import checkpoint
from meteora_jax.io.checkpoint import CorruptCheckpointError

ADAPTERS = {
    "small": dict(r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    "large": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
OPT = {"mu": np.arange(6.0, dtype=np.float32).reshape(2, 3), "count": np.int32(7)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    _, base = make_hf_model(root / "base")
    dirs = {
        n: make_peft_adapter(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    with pytest.warns(UserWarning, match="untrained"):
        model = mj.load_model(base, adapters=dirs)
    ckpt = checkpoint.save_checkpoint(root / "ckpt", model, base)
    return dict(base=base, model=model, ckpt=ckpt)


@pytest.fixture
def ckpt(world, tmp_path):
    """A private copy of the checkpoint, for a test to break."""
    return os.fspath(shutil.copytree(world["ckpt"], tmp_path / "ckpt"))


def meta_file(folder, step=0) -> str:
    return os.path.join(folder, str(step), checkpoint.META_ITEM, checkpoint.META_FILE)


def edit_meta(folder, edit, step=0) -> None:
    path = meta_file(folder, step)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def array_files(folder, step=0) -> list[str]:
    """The data files of the params item, largest first (OCDBT keeps array chunks under `d/`).
    How Orbax spreads the chunks over them varies from save to save, and a file may hold only
    chunks no restore reads: a test that must break a read breaks every one of them."""
    item = os.path.join(folder, str(step), checkpoint.PARAMS_ITEM)
    files = [os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if os.sep + "d" in d]
    return sorted(files, key=os.path.getsize, reverse=True)


def truncate_array_files(folder, step=0, size=None) -> None:
    """Every data file of the params item cut to `size` bytes (None: half its size)."""
    for path in array_files(folder, step):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 if size is None else size)


def flip(path, offset, count=64) -> None:
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    for i in range(offset, min(offset + count, len(raw))):
        raw[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(raw)


def one_line(error) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


def test_every_saved_array_has_a_checksum(world):
    with open(meta_file(world["ckpt"])) as f:
        data = json.load(f)
    assert data["version"] == checkpoint.VERSION == 2
    records = data["checksums"]
    assert set(records) == {"params/" + "/".join(p) for p in checkpoint.model_params(world["model"].module)}
    record = records["params/layers/self_attn/q_proj/gate"]
    assert record["dtype"] == "float32" and record["shape"] == [2, 64, 2] and len(record["sha256"]) == 64


def test_flipped_bytes_in_an_array_file_name_the_array_and_step(ckpt, world):
    """64 flipped bytes at eight places: each is refused naming the array and the step, or (bytes
    no array reads) restores exactly the saved values; never silently other values."""
    path, saved = array_files(ckpt)[0], checkpoint.restore(world["ckpt"]).params
    with open(path, "rb") as f:
        original, refused = f.read(), []
    for offset in range(0, len(original), max(1, len(original) // 8)):
        with open(path, "wb") as f:
            f.write(original)
        flip(path, offset)
        try:
            restored = checkpoint.restore(ckpt).params
        except CorruptCheckpointError as e:
            message = one_line(e)
            refused.append(offset)
            assert f"{ckpt}" in message and "(step 0)" in message, message
            assert re.search(r"array params/layers/\w+/\w+_proj/(gate|lora_a|lora_b|scale)\b", message), (
                message
            )
            continue
        assert all(np.array_equal(restored[k], saved[k]) for k in saved), f"offset {offset}: values changed"
    assert len(refused) >= 4
    with open(path, "wb") as f:
        f.write(original)
    flip(path, refused[len(refused) // 2])  # bytes a restore reads: the model loader refuses them too
    with pytest.raises(CheckpointError, match=r"\(step 0\).*array params/layers/"):
        mj.load_model(world["base"], gates=ckpt)


def test_a_changed_array_fails_its_checksum(ckpt):
    """Values that still decompress (the silent case) are caught by the checksum alone."""
    edit_meta(ckpt, lambda d: d["checksums"]["params/layers/mlp/down_proj/lora_b"].update(sha256="0" * 64))
    with pytest.raises(
        CorruptCheckpointError,
        match=r"\(step 0\): array params/layers/mlp/down_proj/lora_b does not match its checksum",
    ):
        checkpoint.restore(ckpt)


def test_metadata_listing_the_adapters_in_another_order_is_refused_by_load_model(ckpt, world):
    def swap(data):
        data["adapters"].reverse()
        data["adapter_names"].reverse()

    edit_meta(ckpt, swap)
    with pytest.raises(CheckpointError) as info:
        mj.load_model(world["base"], gates=ckpt)
    message = one_line(info.value)
    assert (
        "the arrays do not fit the metadata's adapters: adapter 'large' (#0) at layer 0 q_proj has scale 4"
        in message
    )
    assert "(adapters listed in another order?)" in message
    with pytest.raises(CheckpointError, match="adapters listed in another order"):
        checkpoint.restore(ckpt)  # what export reads: the same check


def test_metadata_with_another_alpha_is_refused(ckpt, world):
    edit_meta(ckpt, lambda d: d["adapters"][0]["modules"][0].update(alpha=16))
    with pytest.raises(
        CheckpointError,
        match=r"adapter 'small' \(#0\) at layer 0 down_proj has scale 4, but its metadata "
        r"\(alpha 16, rank 2\) gives 8",
    ):
        mj.load_model(world["base"], gates=ckpt)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_array_file(ckpt, damage):
    if damage == "delete":
        for path in array_files(ckpt):
            os.remove(path)
    else:
        truncate_array_files(ckpt)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpoint.restore(ckpt)
    message = one_line(info.value)
    item = os.path.join(ckpt, "0", checkpoint.PARAMS_ITEM)
    assert message.startswith(f"{item} (step 0)") and "the checkpoint is damaged" in message, message


@pytest.mark.parametrize("name", ["_METADATA", "manifest.ocdbt"])
def test_damaged_orbax_bookkeeping_files(ckpt, name):
    path = os.path.join(ckpt, "0", checkpoint.PARAMS_ITEM, name)
    with open(path, "wb") as f:
        f.write(b"{not json")
    with pytest.raises(CorruptCheckpointError, match=r"\(step 0\).*the checkpoint is damaged") as info:
        checkpoint.restore(ckpt)
    one_line(info.value)


def test_metadata_that_is_not_json(ckpt, world):
    with open(meta_file(ckpt), "wb") as f:
        f.write(b"{not json")
    expected = f"{meta_file(ckpt)} (step 0): cannot be read, the checkpoint is damaged"
    for load in (lambda: checkpoint.restore(ckpt), lambda: mj.load_model(world["base"], gates=ckpt)):
        with pytest.raises(CorruptCheckpointError) as info:
            load()
        assert one_line(info.value).startswith(expected)


def test_deleted_metadata_file(ckpt):
    os.remove(meta_file(ckpt))
    with pytest.raises(CorruptCheckpointError, match=f"{meta_file(ckpt)} \\(step 0\\).*not found"):
        checkpoint.restore(ckpt)


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (99, r"this meteora-jax reads version 2\)$"),
        (1, r"written before array checksums existed: convert it again"),
        ("2", ""),
    ],
    ids=["future", "v1", "string"],
)
def test_unknown_format_version(ckpt, world, version, why):
    edit_meta(ckpt, lambda d: d.update(version=version))
    with pytest.raises(CheckpointError) as info:
        mj.load_model(world["base"], gates=ckpt)
    message = one_line(info.value)
    assert not isinstance(info.value, CorruptCheckpointError), "another version is not damage: no fallback"
    assert message.startswith(f"{ckpt} (step 0): checkpoint format version {version!r} is not supported")
    assert why == "" or re.search(why, message), message


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("checksums"),
        lambda d: d.update(rank="six"),
        lambda d: d.update(top_k=5),
        lambda d: d["adapters"][1].update(modules="all"),
        lambda d: d["adapters"][1]["modules"][0].update(rank=0),
        lambda d: d["adapters"][1]["modules"][0].update(rank=9),
        lambda d: d["base"].update(config={"model_type": "llama"}),
    ],
    ids=["no-checksums", "rank-type", "top-k", "modules-type", "rank-zero", "rank-too-big", "base-config"],
)
def test_malformed_metadata_is_one_corrupt_error(ckpt, edit):
    edit_meta(ckpt, edit)
    with pytest.raises(CorruptCheckpointError, match=rf"^{ckpt} \(step 0\): ") as info:
        checkpoint.restore(ckpt)
    one_line(info.value)


def test_extra_items_are_verified(world, tmp_path):
    folder = tmp_path / "run"
    checkpoint.save_checkpoint(folder, world["model"], world["base"], step=3, extra_items={"opt": OPT})
    restored = checkpoint.restore(folder, extra_items={"opt": None})
    np.testing.assert_array_equal(restored.extra["opt"]["mu"], OPT["mu"])
    with open(meta_file(folder, 3)) as f:
        records = json.load(f)["checksums"]
    assert {"opt/mu", "opt/count"} <= set(records)
    edit_meta(folder, lambda d: d["checksums"]["opt/mu"].update(sha256="1" * 64), step=3)
    checkpoint.restore(folder)  # the params alone are intact
    with pytest.raises(CorruptCheckpointError, match=r"\(step 3\): array opt/mu does not match its checksum"):
        checkpoint.restore(folder, extra_items={"opt": None})


def test_a_restore_target_of_other_shapes_is_refused_not_called_damage(world, tmp_path):
    """A caller's target that does not fit the stored item (another optimizer's shapes) is the
    caller's mistake: a plain CheckpointError naming the entry, never a fallback to older steps."""
    folder = tmp_path / "run"
    checkpoint.save_checkpoint(folder, world["model"], world["base"], step=3, extra_items={"opt": OPT})
    wrong = {"mu": np.zeros((3, 2), np.float32), "count": np.int32(0)}
    with pytest.raises(
        CheckpointError,
        match=r"\(step 3\): its item 'opt' .*\(mu: float32\[2, 3\] stored, "
        r"float32\[3, 2\] asked",
    ) as info:
        checkpoint.restore(folder, extra_items={"opt": wrong})
    assert not isinstance(info.value, CorruptCheckpointError)
    one_line(info.value)


def test_importing_installs_no_process_wide_hooks():
    """Importing the checkpoint module leaves logging filters and Python's hooks as they were."""
    script = (
        "import logging, sys\n"
        "before = (sys.unraisablehook, sys.excepthook, *(list(logging.getLogger(n).filters) "
        "for n in ('absl', 'asyncio', '')))\n"
        "import meteora_jax.io.checkpoint, meteora_jax.training.loop\n"
        "after = (sys.unraisablehook, sys.excepthook, *(list(logging.getLogger(n).filters) "
        "for n in ('absl', 'asyncio', '')))\n"
        "print(before == after)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stdout + done.stderr


def test_save_args_with_a_training_loops_own_manager(world, tmp_path):
    """The training loop saves through `save_args` with its own (async) manager; restore verifies."""
    params = checkpoint.model_params(world["model"].module)
    meta = checkpoint.read_meta(world["ckpt"])[1]
    handlers = {
        checkpoint.PARAMS_ITEM: ocp.StandardCheckpointHandler(),
        checkpoint.META_ITEM: ocp.JsonCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "run", options=options, item_handlers=handlers) as manager:
        manager.save(7, args=checkpoint.save_args(params, meta, {"opt": OPT}))
        manager.wait_until_finished()
    restored = checkpoint.restore(tmp_path / "run", 7, extra_items={"opt": None})
    assert restored.step == 7 and int(restored.extra["opt"]["count"]) == 7


def test_restore_latest_good_falls_back_past_damaged_steps(world, tmp_path):
    folder = os.fspath(tmp_path / "run")
    for step in (0, 5, 10):
        checkpoint.save_checkpoint(folder, world["model"], world["base"], step=step, extra_items={"opt": OPT})
    truncate_array_files(folder, 10, size=10)
    with open(meta_file(folder, 5), "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint step 10") as record:
        good = checkpoint.restore_latest_good(folder, extra_items={"opt": None})
    assert good.step == 0 and int(good.extra["opt"]["count"]) == 7
    assert any("skipping damaged checkpoint step 5" in str(w.message) for w in record)
    truncate_array_files(folder, 0, size=10)
    with (
        pytest.warns(UserWarning),
        pytest.raises(CorruptCheckpointError, match=f"{folder}: every step is damaged"),
    ):
        checkpoint.restore_latest_good(folder)


def test_a_damaged_latest_step_does_not_block_force(world, ckpt):
    with open(meta_file(ckpt), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CorruptCheckpointError):
        checkpoint.save_checkpoint(ckpt, world["model"], world["base"], step=1)
    checkpoint.save_checkpoint(ckpt, world["model"], world["base"], step=1, force=True)
    assert checkpoint.checkpoint_steps(ckpt) == [1]


def test_the_teardown_filter_drops_closed_loop_reports_only(monkeypatch):
    """Both ways Python prints an error from a callback (unraisable reports, and native code's
    `sys.excepthook`) drop "Event loop is closed" and pass everything else on, once installed."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: seen.append(("unraisable", report.exc_value)))
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(("except", value)))
    checkpoint.quiet_orbax_teardown()
    checkpoint.quiet_orbax_teardown()  # a second install wraps nothing twice
    closed, other = RuntimeError("Event loop is closed"), RuntimeError("disk on fire")
    for error in (closed, other):
        sys.unraisablehook(type("Report", (), {"exc_value": error})())
        sys.excepthook(RuntimeError, error, None)
    assert seen == [("unraisable", other), ("except", other)]


def test_after_a_failed_restore_asyncio_drops_late_reports_of_that_step_only(ckpt, tmp_path):
    """Sibling reads of the refused step fail too; asyncio reports them when their tasks are
    collected ("Task exception was never retrieved"). Only those are dropped."""
    truncate_array_files(ckpt, size=100)
    with pytest.raises(checkpoint.CorruptCheckpointError):
        checkpoint.restore(ckpt)

    def report(folder):
        error = ValueError(f'OUT_OF_RANGE: Error reading "x/.zarray" at local file "{folder}/params/": cut')
        return logging.LogRecord(
            "asyncio",
            logging.ERROR,
            __file__,
            1,
            "Task exception was never retrieved",
            None,
            (ValueError, error, None),
        )

    logger = logging.getLogger("asyncio")
    assert not logger.filter(report(os.path.abspath(os.path.join(ckpt, "0"))))
    assert logger.filter(report(os.fspath(tmp_path / "elsewhere" / "0")))


def test_a_failed_restore_prints_no_tracebacks(ckpt):
    """Orbax leaves tensorstore reads in flight when one fails; their callbacks must stay quiet."""
    truncate_array_files(ckpt, size=100)
    script = (
        "import sys, time\n"
        "from meteora_jax.io import checkpoint\n"
        "try:\n"
        f"    checkpoint.restore({ckpt!r})\n"
        "except checkpoint.CorruptCheckpointError as e:\n"
        "    print('refused:', e)\n"
        "time.sleep(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "refused:" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr
