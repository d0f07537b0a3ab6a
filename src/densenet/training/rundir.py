"""The run directory: every file a training run writes goes through :class:`RunDirectory`, and only
the main process writes (with several processes, the others compute the same state and stay quiet).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import os
import socket
import tempfile
from pathlib import Path
from typing import IO

from torch import nn

from densenet.errors import CheckpointError, ConfigError
from densenet.files import atomic_write, remove_leftovers
from densenet.training.config import TrainConfig, load_config, save_config
from densenet.training.distributed import current_context
from densenet.training.metrics import Row
from densenet.training.plots import plot_curves
from densenet.training.state import SavedRun, TrainState, load_state, save_state
from densenet.weights.io import save_weights


class RunDirectory:
    CONFIG, STATE, METRICS, CURVES = "config.toml", "last.pt", "metrics.csv", "curves.png"
    BEST, FINAL, EMA = "best.safetensors", "final.safetensors", "ema.safetensors"
    # Held (flock) by the process training the run, so no second run writes into it; the kernel
    # drops the lock when that process ends, however it ends.
    LOCK = ".densenet.lock"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: IO[str] | None = None
        self._made = False  # by this process, for this run

    @property
    def writes(self) -> bool:
        # Asked at each write: the process group may start after the directory is named.
        return current_context().is_main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def check_writable(path: Path) -> None:
        """Make ``path`` if needed and prove a file can be written there, or say why not."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            # A fresh name: a probe must never replace or delete a file of the user's.
            handle, probe = tempfile.mkstemp(prefix=".densenet-probe-", dir=path)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise ConfigError(
                f"cannot write to {path} ({error.strerror or error}); choose another directory"
            ) from None

    @staticmethod
    def new_default(parent: Path, name: str) -> RunDirectory:
        """A directory ``parent/name`` that did not exist, made now (``name-2``, ... if taken)."""
        for attempt in itertools.count(1):
            path = parent / (name if attempt == 1 else f"{name}-{attempt}")
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                continue
            except OSError as error:
                raise ConfigError(
                    f"cannot write to {parent} ({error.strerror or error}); use --out"
                ) from None
            return RunDirectory(path)
        raise AssertionError("unreachable")

    def create(self) -> None:
        """Claim the directory for a new run, before any data is read or time spent.

        It may be new, empty, or left by an attempt that failed before its config was written;
        a run, or a directory holding anything else, is never written into.
        """
        if not self.writes:
            return
        self._made = not self.path.exists()
        self.check_writable(self.path)
        self._check_new()  # before the lock file: nothing is written into a foreign directory
        self._claim()
        self._check_new()  # a run that held the lock until now may have written its config

    def _check_new(self) -> None:
        if (self / self.CONFIG).exists():
            raise ConfigError(
                f"{self.path} already holds a run; continue it with --resume {self.path} or "
                "choose another --out"
            )
        foreign = sorted(p.name for p in self.path.iterdir() if p.name != self.LOCK)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"{self.path} is not empty ({shown}) and is not a densenet run; choose a new or "
                "empty --out"
            )

    def release(self) -> None:
        """Let the directory go once the run has ended (the lock file goes with it)."""
        if self._lock is not None:
            (self / self.LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def abandon(self) -> None:
        """Remove a directory this process made for a run that failed before writing anything."""
        if self.writes and self._lock is not None and not (self / self.CONFIG).exists():
            self.release()
            if self._made:
                with contextlib.suppress(OSError):  # not empty after all: leave it
                    self.path.rmdir()

    def check_resumable(self) -> TrainConfig:
        """The run's saved config, once the directory is claimed and shown to be resumable."""
        if not (self / self.CONFIG).is_file():
            raise CheckpointError(f"{self.path} is not a run directory (no {self.CONFIG} in it)")
        if self.writes:
            self._claim()
        results = [n for n in (self.METRICS, self.BEST, self.FINAL) if (self / n).exists()]
        if results and not (self / self.STATE).exists():
            raise CheckpointError(
                f"{self.path} has results ({', '.join(results)}) but no {self.STATE}: resuming "
                "would train from epoch 1 over them; start a new run with another --out"
            )
        return load_config(self / self.CONFIG)

    def _claim(self) -> None:
        """Hold this directory's lock, or say which process does; then tidy what crashes left."""
        try:
            handle = open(self / self.LOCK, "a+")  # noqa: SIM115 (held until the process ends)
        except OSError as error:
            raise ConfigError(
                f"cannot write to {self.path} ({error.strerror or error}); choose another directory"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self.path} is in use by {holder}; wait for it to end (or stop it), or choose "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle
        remove_leftovers(self.path)

    def write_config(self, config: TrainConfig) -> None:
        if self.writes:
            save_config(config, self / self.CONFIG)

    def read_state(self) -> SavedRun | None:
        path = self / self.STATE
        return load_state(path) if path.exists() else None

    def write_state(
        self,
        state: TrainState,
        learners: dict[str, dict],
        config: dict[str, object],
        model_config: dict[str, object],
    ) -> None:
        if self.writes:
            save_state(self / self.STATE, state, learners, config, model_config)

    def write_weights(self, model: nn.Module, name: str, meta: dict[str, object]) -> None:
        if self.writes:
            save_weights(model, self / name, meta=meta)

    def write_metrics(self, history: list[Row]) -> None:
        """Rewrite metrics.csv and curves.png from the whole history (kept in the state)."""
        if not self.writes:
            return
        text = io.StringIO()
        rows = [row.csv_row() for row in history]
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self / self.METRICS, lambda tmp: tmp.write_text(text.getvalue()))
        plot_curves(history, self / self.CURVES)
