"""Writing files so that readers only see complete ones: never half-written, never rejected."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write (and check) a file under.

    If the block succeeds the file is synced and renamed over ``path``; if it raises, the temporary
    file is removed and ``path`` is left as it was.
    """
    # A hidden name of this process's own, with path's suffix (some writers go by it): two writers
    # can't clobber each other, and a crash leaves no file that looks finished.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``: never a half-written file."""
    with staged(path) as tmp:
        write(tmp)
