"""Training checkpoints: the whole state needed to continue a run, written atomically.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, so it loads with
``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from densenet.errors import CheckpointError, first_line
from densenet.files import atomic_write

FORMAT_TAG = "densenet-train/1"


def save_checkpoint(state: dict[str, object], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT_TAG, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, object]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, unsafe object: all mean "unusable"
        reason = first_line(error)
        raise CheckpointError(
            f"{path} is truncated or corrupt ({reason}); it cannot be resumed"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a densenet training checkpoint")
    return state
