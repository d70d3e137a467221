"""Stopping a run when asked: Ctrl-C (SIGINT) or a scheduler's SIGTERM.

Python raises Ctrl-C as a KeyboardInterrupt wherever the main thread happens to be, which may
be a garbage-collection callback (where it is ignored and the run goes on) or the middle of a
checkpoint save. So while a one-process run trains, both signals only set a flag; the loop
reads it after each step, saves that step and raises `RunStopped`, and the command line says
what was kept in one line. A second signal acts at once, as usual. Several processes keep the
default handlers: a flag seen by one process alone would leave the others in a collective save.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BaseException):  # noqa: N818 (like KeyboardInterrupt: asked for, not an error)
    """A run stopped by signal `signum` after saving its last step; the message says what was kept."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal that asked the run to stop (None: none yet)."""

    def __init__(self):
        self.signum: int | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """For the block: SIGINT / SIGTERM set the yielded request's `signum` (then restore the
    previous handlers, so a second signal acts at once); unchanged off the main thread or with
    several processes."""
    request = StopRequest()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def ask(signum, frame):
        request.signum = signum
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in SIGNALS:
        signal.signal(s, ask)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """For the block (on the main thread): SIGTERM raises `RunStopped` where the program is, as
    Ctrl-C raises KeyboardInterrupt, so `finally` blocks run and half-written temporary outputs
    are removed instead of being left behind by a silent kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise RunStopped(signal.Signals(signum).name, signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
