"""A run's training state: everything needed to continue it at a step, saved atomically.

The state file (``last.pt``) is a ``torch.save`` dict of tensors and plain Python values only, so
it loads with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from densenet.errors import CheckpointError, first_line
from densenet.files import atomic_write
from densenet.training.metrics import Row, Tally, row_from_dict

FORMAT_TAG = "densenet-train/3"  # 3: the "ema" state dict
# The state dicts of what learns, saved beside the run's position ("ema" is empty without one).
LEARNER_KEYS = ("model", "optimizer", "scaler", "ema")


@dataclass
class TrainState:
    """Where a run stands: the next step to take, this epoch's sums so far and the history."""

    epoch: int = 0
    step: int = 0
    tally: Tally = field(default_factory=Tally)
    data_seconds: float = 0.0  # this epoch's time waiting for batches
    compute_seconds: float = 0.0  # and everything else
    history: list[Row] = field(default_factory=list)
    best_score: float = -1.0  # test top-1, or mean AUROC for multi-label runs

    def next_epoch(self, row: Row) -> None:
        self.history.append(row)
        self.best_score = max(self.best_score, row.score)
        self.epoch, self.step, self.tally = self.epoch + 1, 0, Tally()
        self.data_seconds = self.compute_seconds = 0.0


@dataclass
class SavedRun:
    """A state file read back: the position, the learners' state dicts and the configs."""

    state: TrainState
    learners: dict[str, dict]  # LEARNER_KEYS -> state_dict
    config: dict[str, object]
    model_config: dict[str, object]


def save_state(
    path: Path,
    state: TrainState,
    learners: dict[str, dict],
    config: dict[str, object],
    model_config: dict[str, object],
) -> None:
    data = {
        "format": FORMAT_TAG,
        **learners,
        "config": config,
        "model_config": model_config,
        "epoch": state.epoch,
        "step": state.step,
        "tally": dataclasses.asdict(state.tally),
        "data_seconds": state.data_seconds,
        "compute_seconds": state.compute_seconds,
        "history": [dataclasses.asdict(row) for row in state.history],
        # Named before multi-label runs, whose score is their mean AUROC.
        "best_top1": state.best_score,
    }
    atomic_write(path, lambda tmp: _save(data, tmp))


def _save(data: dict[str, object], path: Path) -> None:
    # Through a Python file: a full disk is then an OSError naming the file, not torch's own error.
    with open(path, "wb") as handle:
        torch.save(data, handle)


def load_state(path: Path) -> SavedRun:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, unsafe object: all mean "unusable"
        reason = first_line(error)
        raise CheckpointError(
            f"{path} is truncated or corrupt ({reason}); it cannot be resumed"
        ) from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("densenet-train/"):
        raise CheckpointError(f"{path} is not a densenet training state")
    if data["format"] != FORMAT_TAG:
        raise CheckpointError(
            f"{path} was written by another version of densenet ({data['format']}, this one "
            f"reads {FORMAT_TAG}); it cannot be resumed here"
        )

    def typed(key: str, kind: type):
        value = data.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{path} has no valid {key!r} ({kind.__name__} expected); it cannot be resumed"
            )
        return value

    try:
        state = TrainState(
            epoch=typed("epoch", int),
            step=typed("step", int),
            tally=Tally(**typed("tally", dict)),
            data_seconds=typed("data_seconds", float),
            compute_seconds=typed("compute_seconds", float),
            history=[row_from_dict(row) for row in typed("history", list)],
            best_score=typed("best_top1", float),
        )
    except TypeError as error:  # a history row or tally with missing or unknown fields
        reason = first_line(error)
        raise CheckpointError(f"{path} is damaged ({reason}); it cannot be resumed") from None
    learners = {key: typed(key, dict) for key in LEARNER_KEYS}
    return SavedRun(state, learners, typed("config", dict), typed("model_config", dict))
