"""Writing files so that readers only see complete ones: never half-written, never rejected.

A write that fails (a full disk, a quota, read-only or failing storage) removes its temporary file,
leaves the previous file as it was and raises a one-line :class:`WriteError` naming the file.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from densenet.errors import WriteError

# Where freeing space or choosing another place is the fix.
SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The temporary names of staged(): hidden, with the writing process's id.
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp(\.[^.]*)?$")


def cache_dir() -> Path:
    """Where densenet keeps files between runs: downloads and built kernels."""
    root = os.environ.get("DENSENET_CACHE") or Path.home() / ".cache" / "densenet"
    return Path(root)


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
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_error(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or str(error)
    if error.errno in SPACE_ERRORS:
        return WriteError(f"cannot write {path}: {reason}; free some space or write elsewhere")
    return WriteError(f"cannot write {path}: {reason}")


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``directory``.

    Only call this while no other process writes there (a run directory one holds the lock of).
    """
    leftovers = [p for p in directory.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``: never a half-written file."""
    with staged(path) as tmp:
        write(tmp)
