"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class DenseNetError(Exception):
    """A problem with the user's input (config, file, dataset), with what to do about it."""


class ConfigError(DenseNetError, ValueError):
    """An invalid architecture, recipe or command-line setting."""


class WeightsError(DenseNetError):
    """A weights file that cannot be read or does not fit the model."""
