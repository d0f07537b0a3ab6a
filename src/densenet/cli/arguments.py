"""Argument types the commands share: a value that cannot work is refused while the command line
is parsed, before any file is read or any time is spent."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def output_file(text: str) -> Path:
    """A file to write, in a folder that exists or can be made there, and may be written to."""
    path = Path(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a directory: give a file name")
    folder = path.parent
    # The folders that don't exist yet are made by the command: the first that exists decides.
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(
            f"{path} would be inside {folder}, which is a file: choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write in {folder} (read-only, or no permission): choose another path"
        )
    return path
