"""Errors a user can cause. Each message names the file, tensor or setting at fault.

Every one is a `MeteoRAError`, so the command line reports any of them as one line (exit 2) and
API callers catch one class. The file errors also derive from the builtin they replace, so
`except FileNotFoundError` / `except FileExistsError` keep working.
"""

import errno
import os
import re


class MeteoRAError(ValueError):
    """Base class for problems with user-supplied configs, files and inputs."""


class ConfigError(MeteoRAError):
    """A config (file or setting) is invalid or unsupported."""


class CheckpointError(MeteoRAError):
    """A weights file is missing tensors, has extra ones, or has the wrong shapes."""


class MissingFileError(MeteoRAError, FileNotFoundError):
    """An input file or folder the user named does not exist."""


class OutputExistsError(MeteoRAError, FileExistsError):
    """An output already exists and overwriting it was not asked for (`--force` / `force=True`)."""


class OutputPathError(MeteoRAError):
    """An output path that must never be written: empty, the current or home folder, the root,
    or one that is, holds or lies inside one of the command's inputs."""


class TrainingError(MeteoRAError):
    """A run that cannot go on: a non-finite loss, a folder it may not use."""


# Errors of the machine the user points us at, not of our code: a full disk or quota, a read-only
# file system. Libraries that write in the background (Orbax) raise them wrapped in their own.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


# tensorstore (under Orbax) reports a failed write as a ValueError whose status text ends with
# `[os_error_code='28']` and names the file in quotes: the only place its errno is given.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_TENSORSTORE_PATH = re.compile(r'"(/[^"]+)"')


def storage_error(exc: BaseException) -> OSError | None:
    """The full-disk / read-only `OSError` behind `exc` (itself, or one it was raised from or
    during, or a tensorstore write error carrying such an errno), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        code = _TENSORSTORE_ERRNO.search(str(exc)) if isinstance(exc, ValueError) else None
        if code is not None and int(code.group(1)) in STORAGE_ERRNOS:
            paths = _TENSORSTORE_PATH.findall(str(exc))
            number = int(code.group(1))
            return OSError(number, os.strerror(number), paths[-1] if paths else None)
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(exc: OSError, where: str | None = None) -> str:
    """`exc` as "PATH: what happened" (the strerror, as the shell says it); PATH is the file the
    error names, else `where` (a failed write names no file)."""
    what = exc.strerror or str(exc)
    path = exc.filename or where
    return f"{path}: {what}" if path else what
