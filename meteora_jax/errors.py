"""Errors a user can cause. Each message names the file, tensor or setting at fault.

Every one is a `MeteoRAError`, so the command line reports any of them as one line (exit 2) and
API callers catch one class. The file errors also derive from the builtin they replace, so
`except FileNotFoundError` / `except FileExistsError` keep working.
"""


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
