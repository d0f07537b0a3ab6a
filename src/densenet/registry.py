"""Building models by name, optionally with weights."""

from __future__ import annotations

import difflib
import fnmatch
import os

from densenet.errors import ConfigError, WeightsError
from densenet.model import DenseNet, DenseNetConfig
from densenet.presets import PRESETS, ModelSpec
from densenet.weights import Checkpoint, load_state_dict, read_checkpoint


def list_models(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style ``pattern``, in table order."""
    return [name for name in PRESETS if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}{hint} (`densenet list` shows all {len(PRESETS)})"
        ) from None


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | Checkpoint | None = None,
    num_classes: int | None = None,
    **overrides: object,
) -> DenseNet:
    """Build the preset ``name``, with any config field overridden, and load ``weights`` if given.

    ``weights`` is a file path, a URL, or a :class:`Checkpoint` already read.

    With weights, the head keeps the checkpoint's number of classes unless ``num_classes`` asks for
    another, in which case the backbone is loaded and a fresh head is initialised.
    """
    config = get_spec(name).config.replace(**overrides)
    if weights is None:
        return DenseNet(
            config.replace(num_classes=config.num_classes if num_classes is None else num_classes)
        )
    checkpoint = weights if isinstance(weights, Checkpoint) else read_checkpoint(weights)
    if checkpoint.config is not None:
        _check_same_architecture(config, checkpoint.config, checkpoint.source)
    model = DenseNet(config.replace(num_classes=checkpoint.num_classes or config.num_classes))
    load_state_dict(model, checkpoint.state_dict, checkpoint.source)
    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_classifier(num_classes)
    return model


def load_model(source: str | os.PathLike[str]) -> tuple[DenseNet, Checkpoint]:
    """Rebuild a model from a self-describing weights file; returns it with the file's metadata."""
    checkpoint = read_checkpoint(source)
    return model_from_checkpoint(checkpoint), checkpoint


def model_from_checkpoint(checkpoint: Checkpoint) -> DenseNet:
    """The model a self-describing checkpoint (one that carries its config) holds."""
    if checkpoint.config is None:
        raise WeightsError(
            f"{checkpoint.source} carries no model config; use "
            "create_model(NAME, weights=FILE) to say which architecture it is"
        )
    model = DenseNet(checkpoint.config)
    load_state_dict(model, checkpoint.state_dict, checkpoint.source)
    return model


def _check_same_architecture(wanted: DenseNetConfig, stored: DenseNetConfig, source: str) -> None:
    # The head size and dropout may legitimately differ (fine-tuning); nothing else may.
    ignore = {"num_classes", "drop_rate"}
    wanted_fields, stored_fields = wanted.to_dict(), stored.to_dict()
    different = [
        f"{key}={stored_fields[key]!r} (model has {wanted_fields[key]!r})"
        for key in wanted_fields
        if key not in ignore and wanted_fields[key] != stored_fields[key]
    ]
    if different:
        raise WeightsError(f"{source} holds a different architecture: {', '.join(different)}")
