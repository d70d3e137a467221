"""Writing outputs safely: a file or folder appears under its name complete, or not at all.

Converting, exporting and training write checkpoints that take minutes and gigabytes; a crash,
a full disk or Ctrl-C half-way must never leave a half-written folder that a later run loads,
nor destroy the previous output before its replacement is complete. Everything is therefore
built under a temporary sibling name (same folder, so same file system) and renamed into
place, the old output being moved aside first and moved back if the final rename fails.
Before any of that, `check_output_path` refuses a path whose replacement could destroy
something that is not an output: the current or home folder, the root, or an input.
Also here: the one way to report many problems at once (`raise_problems`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from meteora_jax.errors import OutputExistsError, OutputPathError

_NAME_IN_PREFIX = 100  # characters of the output's name kept in temporary names (NAME_MAX is 255)
API_SETTING = "output path"  # how an output is named when no command-line flag names it


def check_output_path(
    out: str | os.PathLike | None,
    *,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    setting: str = "--out",
) -> None:
    """Refuses an output path whose writing could destroy something other than an old output.

    Refused whether or not overwriting is allowed: an empty path, the filesystem root, the
    current folder or one of its ancestors, the home folder or one of its ancestors, and any
    path that is, lies inside or contains one of `inputs` ((flag, path) pairs; None paths are
    skipped). Paths are compared after `os.path.realpath`, so links and `..` hide nothing.
    Raises OutputPathError naming `setting`, the path and what it collides with.
    """
    text = "" if out is None else os.fspath(out)
    if text == "":
        raise OutputPathError(f"{setting} is empty: name the file or folder to write")
    real = os.path.realpath(text)
    shown = text if text == real else f"{text} ({real})"
    for label, protected in _protected_folders():
        if _inside(protected, real):
            relation = "is" if protected == real else "contains"
            raise OutputPathError(
                f"{setting} {shown} {relation} {label} {protected}: writing there could replace it; "
                "choose another path"
            )
    for flag, path in inputs:
        if path is None:
            continue
        relation = _overlap(real, os.path.realpath(os.fspath(path)))
        if relation:
            raise OutputPathError(
                f"{setting} {shown} {relation} {flag} {os.fspath(path)}: an output must not overlap "
                "an input; choose another path"
            )


def _protected_folders() -> list[tuple[str, str]]:
    """(label, real path) of the folders no output may be or contain: root, current, home."""
    folders = [("the filesystem root", os.path.realpath(os.sep))]
    with contextlib.suppress(OSError):  # a deleted current folder has no path to protect
        folders.append(("the current folder", os.path.realpath(os.getcwd())))
    home = os.path.expanduser("~")
    if home != "~":  # "~" comes back unexpanded when no home folder is known
        folders.append(("the home folder", os.path.realpath(home)))
    return folders


def _inside(inner: str, outer: str) -> bool:
    """Whether real path `inner` is `outer` or lies below it."""
    return os.path.commonpath([inner, outer]) == outer


def _overlap(out: str, other: str) -> str | None:
    """How real path `out` overlaps real path `other`: "is", "is inside", "contains", or None."""
    if out == other:
        return "is"
    if _inside(out, other):
        return "is inside"
    if _inside(other, out):
        return "contains"
    return None


def refuse_existing(out_dir: str | os.PathLike, *, force: bool = False, setting: str = API_SETTING) -> None:
    """Refuses a path `check_output_path` forbids, then an existing file, link or non-empty
    folder unless `force` (OutputExistsError, a FileExistsError).

    Commands call it before any long work, so a taken output name fails at once.
    """
    check_output_path(out_dir, setting=setting)
    out_dir = os.path.abspath(os.fspath(out_dir))
    empty_dir = os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir)
    if os.path.lexists(out_dir) and not empty_dir and not force:
        raise OutputExistsError(
            f"{out_dir} already exists (refusing to overwrite it: pass --force / force=True)"
        )


@contextlib.contextmanager
def naming(path: str | os.PathLike, *, unnamed_only: bool = False) -> Iterator[None]:
    """An OS error in the block names `path`, the output the user asked for, not the temporary
    twin or lock file the block touched (`unnamed_only`: only an error that names no file, as a
    failed write or flush does)."""
    try:
        yield
    except OSError as e:
        if e.errno is None or (unnamed_only and e.filename is not None):
            raise
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder next to `out_dir` that becomes `out_dir` when the block succeeds.

    An existing `out_dir` (other than an empty folder) is refused, on entry and again before the
    swap, unless `force`. With `force` the old one is renamed aside, the new one renamed into
    place, and only then is the old one deleted; if that rename fails the old one is moved back.
    If the block raises, the temporary folder is removed and `out_dir` is untouched. A path
    `check_output_path` forbids is refused first.
    """
    refuse_existing(out_dir, force=force)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    with naming(out_dir):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name[:_NAME_IN_PREFIX]}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        refuse_existing(out_dir, force=force)  # the name may have been taken while we wrote
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: str, out_dir: str) -> None:
    parent, name = os.path.split(out_dir)
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        _fsync_dir(parent)
        return
    # The old output goes inside a fresh folder, so a file or a link moves aside as well as a folder.
    trash = tempfile.mkdtemp(prefix=f".{name[:_NAME_IN_PREFIX]}.old-", dir=parent)
    old = os.path.join(trash, "old")
    try:
        os.replace(out_dir, old)
    except BaseException:
        os.rmdir(trash)
        raise
    try:
        os.replace(tmp, out_dir)
    except BaseException as error:
        try:
            os.replace(old, out_dir)
        except BaseException:
            error.add_note(f"the previous {out_dir} could not be moved back: it is kept at {old}")
            raise error  # noqa: B904 (the failed move back stays attached as the context)
        os.rmdir(trash)
        raise
    _fsync_dir(parent)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file that becomes `path` (mode 0644) when the block succeeds.

    It is a temporary file in the same folder, flushed and fsynced before it is renamed over
    `path`; if the block (or the rename) fails it is removed and `path` is untouched. A path
    `check_output_path` forbids is refused first.
    """
    check_output_path(path, setting=API_SETTING)
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    with naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{name[:_NAME_IN_PREFIX]}.tmp-", dir=folder)
    try:
        with naming(path, unnamed_only=True), os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with naming(path):
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` as UTF-8 to `path` atomically (see `atomic_file`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _fsync_dir(folder: str) -> None:
    """Makes a rename in `folder` durable; best effort (some systems cannot fsync a folder)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def raise_problems(
    error_cls: type[Exception], where: str, problems: list[str], *, max_shown: int = 12
) -> None:
    """Raises `error_cls("where: p1; p2; ...; and N more")` listing the first `max_shown` problems.

    Does nothing when `problems` is empty, so checks collect every problem and call it once.
    """
    if not problems:
        return
    shown = "; ".join(problems[:max_shown])
    more = f"; and {len(problems) - max_shown} more" if len(problems) > max_shown else ""
    raise error_cls(f"{where}: {shown}{more}")
