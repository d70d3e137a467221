"""One training run per run folder: an exclusive lock on RUN/.meteora-run.lock for the run's life.

Two runs writing one folder would interleave checkpoints and logs. The lock is `flock`, which the
kernel drops when its process ends however it ends (kill -9 included), so a killed run never
leaves a stale lock behind and the next run simply resumes. Only process 0 takes it: it is the
one that writes logs, and the other hosts may not share its file system's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import jax

from meteora_jax.errors import TrainingError
from meteora_jax.io import files

LOCK_FILE = ".meteora-run.lock"


def _in_use(run_dir: str, command: str) -> TrainingError:
    return TrainingError(
        f"{run_dir} is in use by another meteora-jax training run (it holds the lock "
        f"{os.path.join(run_dir, LOCK_FILE)}): wait for that run to end, or give {command} another --out"
    )


def check_not_in_use(run_dir: str, command: str) -> None:
    """Raises if a live run holds `run_dir`'s lock (before anything touches the folder)."""
    path = os.path.join(run_dir, LOCK_FILE)
    if jax.process_index() != 0 or not os.path.isfile(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, command) from None
    finally:
        os.close(fd)  # also releases the probe's shared lock


@contextlib.contextmanager
def hold(run_dir: str, command: str) -> Iterator[None]:
    """Holds `run_dir`'s lock (creating the folder) for the `with` block; raises if another run has it."""
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    with files.naming(run_dir):  # the run folder, not the lock file the user never named
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, command) from None
        yield
    finally:
        os.close(fd)  # releases the lock
