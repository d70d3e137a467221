"""Errors a user can cause. Each message names the file, tensor or setting at fault."""


class MeteoRAError(ValueError):
    """Base class for problems with user-supplied configs, files and inputs."""


class ConfigError(MeteoRAError):
    """A config (file or setting) is invalid or unsupported."""


class CheckpointError(MeteoRAError):
    """A weights file is missing tensors, has extra ones, or has the wrong shapes."""
