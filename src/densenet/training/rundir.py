"""The run directory: every file a training run writes goes through :class:`RunDirectory`, and only
the main process writes (with several processes, the others compute the same state and stay quiet).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from torch import nn

from densenet.errors import CheckpointError, ConfigError
from densenet.files import atomic_write
from densenet.training.config import TrainConfig, load_config, save_config
from densenet.training.distributed import current_context
from densenet.training.metrics import EpochRow
from densenet.training.plots import plot_curves
from densenet.training.state import SavedRun, TrainState, load_state, save_state
from densenet.weights.io import save_weights

METRICS = EpochRow.columns()


class RunDirectory:
    CONFIG, STATE, METRICS, CURVES = "config.toml", "last.pt", "metrics.csv", "curves.png"
    BEST, FINAL = "best.safetensors", "final.safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"cannot write to {path} ({error.strerror or error}); choose another directory"
            ) from None

    def create(self) -> None:
        """Make the directory and prove it is writable, before any data is read or time spent."""
        if (self / self.CONFIG).exists():
            raise ConfigError(
                f"{self.path} already holds a run; continue it with --resume {self.path} or "
                "choose another --out"
            )
        if self.writes:
            self.check_writable(self.path)

    def check_resumable(self) -> TrainConfig:
        """The run's saved config; the directory must be a run and writable."""
        if not (self / self.CONFIG).is_file():
            raise CheckpointError(f"{self.path} is not a run directory (no {self.CONFIG} in it)")
        if self.writes:
            self.check_writable(self.path)
        return load_config(self / self.CONFIG)

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

    def write_metrics(self, history: list[EpochRow]) -> None:
        """Rewrite metrics.csv and curves.png from the whole history (kept in the state)."""
        if not self.writes:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRICS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in history)
        atomic_write(self / self.METRICS, lambda tmp: tmp.write_text(text.getvalue()))
        plot_curves(history, self / self.CURVES)
