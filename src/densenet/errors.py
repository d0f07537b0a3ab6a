"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import importlib
from collections.abc import Sequence


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

    exit_status = 2  # what the CLI exits with
    label = "error"  # and how it introduces the message


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


class Preempted(DenseNetError):
    """A run stopped on request (SIGTERM, SIGUSR1) after saving its state: resume it later."""

    exit_status = 75  # EX_TEMPFAIL: a temporary failure, to be retried
    label = "stopped"


class Interrupted(DenseNetError):
    """Ctrl-C during a run that has a saved state to continue from."""

    exit_status = 130  # the shell's status for SIGINT
    label = "interrupted"


class WriteError(DenseNetError):
    """A file that could not be written: full disk, quota, read-only or failing storage."""


class MissingPackageError(DenseNetError):
    """An optional dependency that is not installed, with the command that installs it."""


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Refuse a setting that is not one of ``choices`` (a ``Literal`` type's arguments)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def require(*packages: str, purpose: str, extra: str) -> None:
    """Refuse ``purpose``, with the command that installs them, if any of ``packages`` is missing.

    ``extra`` is the ``densenet[...]`` extra of pyproject.toml that holds ``packages``.
    """
    missing = []
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if missing[1:] else missing[0]
        noun = "packages" if missing[1:] else "package"
        raise MissingPackageError(
            f"{purpose} needs the {names} {noun}: pip install 'densenet[{extra}]'"
        )
