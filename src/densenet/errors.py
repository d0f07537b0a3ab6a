"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: values from files can be any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DenseNetError(Exception):
    """A problem with the user's input (config, file, dataset), with what to do about it."""


class ConfigError(DenseNetError, ValueError):
    """An invalid architecture, recipe or command-line setting."""


class WeightsError(DenseNetError):
    """A weights file that cannot be read or does not fit the model."""


class DatasetError(DenseNetError):
    """A dataset that is missing, incomplete or unreadable."""


class CheckpointError(DenseNetError):
    """A training checkpoint or run directory that cannot be used to resume."""


class TrainingError(DenseNetError):
    """Training that cannot go on (a non-finite loss), with where to restart from."""
