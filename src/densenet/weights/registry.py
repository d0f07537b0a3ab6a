"""Building models by name, optionally with weights."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from densenet.errors import ConfigError, WeightsError
from densenet.models.densenet import DenseNet, DenseNetConfig
from densenet.models.features import FeatureExtractor
from densenet.models.presets import PRESETS, ModelSpec, Preprocessing
from densenet.weights.download import is_url
from densenet.weights.io import (
    Checkpoint,
    fitted_state_dict,
    looks_like_a_file,
    read_checkpoint,
)
from densenet.weights.pretrained import find_published, unknown_source_error

# The stem's convolution, the only layer whose shape depends on the image's channels.
FIRST_CONV = "features.conv0.weight"


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
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **overrides: object,
) -> DenseNet | FeatureExtractor:
    """Build the preset ``name``, with any config field overridden, and load ``weights`` if given.

    ``weights`` is a local file, a URL (downloaded once into the cache), the name of published
    weights (``"tv_in1k"``, see ``densenet.weights.pretrained.PUBLISHED``) or a :class:`Checkpoint`
    already read. With weights, the head keeps the checkpoint's number of classes unless
    ``num_classes`` asks for another, in which case the backbone is loaded and a fresh head is
    initialised. ``features_only`` returns a :class:`FeatureExtractor` giving the feature maps of
    the levels in ``out_indices``.
    """
    if out_indices is not None and not features_only:
        raise ConfigError("out_indices selects feature maps: it needs features_only=True")
    config = get_spec(name).config.replace(**overrides)
    if weights is None:
        if num_classes is not None:
            config = config.replace(num_classes=num_classes)
        model = DenseNet(config)
    else:
        model = _load_pretrained(name, config, weights, num_classes, features_only)
    return FeatureExtractor(model, out_indices) if features_only else model


def _read_weights(name: str, weights: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    """Read ``weights`` given as a checkpoint, a file, a URL or a published name for ``name``."""
    if isinstance(weights, Checkpoint):
        return weights
    source = os.fspath(weights)
    published = None
    if not is_url(source) and not looks_like_a_file(source):
        published = find_published(name, source)
        if published is None:
            raise unknown_source_error(name, source)
        source = published.url
    return read_checkpoint(source, published.hash if published else None)


def _load_pretrained(
    name: str,
    config: DenseNetConfig,
    weights: str | os.PathLike[str] | Checkpoint,
    num_classes: int | None,
    features_only: bool,
) -> DenseNet:
    checkpoint = _read_weights(name, weights)
    if config.in_channels == 1:
        checkpoint = gray_from_rgb(checkpoint)
    source = checkpoint.source
    if checkpoint.config is not None:
        _check_same_architecture(config, checkpoint.config, source)
    foreign_backbone = checkpoint.num_classes is None and checkpoint.config is None
    if foreign_backbone and num_classes is None and not features_only:
        raise WeightsError(
            f"{source} holds no classifier, only the backbone: pass num_classes=N for a new "
            "head, num_classes=0 for none, or features_only=True"
        )
    model = fitted_model(config.replace(num_classes=checkpoint.num_classes or 0), checkpoint)
    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_classifier(num_classes)
    return model


def gray_from_rgb(checkpoint: Checkpoint) -> Checkpoint:
    """RGB weights for one-channel images (X-rays): the first convolution's filters summed over
    the colour channels, and the preprocessing's mean and std averaged over them.

    A gray image is an RGB image with equal channels, on which a convolution computes the sum of
    its three filters applied to the gray values: the summed filter gives the RGB network's
    outputs exactly, so everything learnt from colour images carries over. Weights that are
    already one-channel are returned unchanged.
    """
    first = checkpoint.state_dict.get(FIRST_CONV)
    if first is None or first.shape[1] != 3:
        return checkpoint
    state_dict = {**checkpoint.state_dict, FIRST_CONV: first.sum(1, keepdim=True)}
    config = checkpoint.config and checkpoint.config.replace(in_channels=1)
    preprocessing = checkpoint.preprocessing and checkpoint.preprocessing.gray()
    meta = dict(checkpoint.meta)
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing.to_dict()
    return replace(
        checkpoint, state_dict=state_dict, config=config, meta=meta, preprocessing=preprocessing
    )


def load_model(
    source: str | os.PathLike[str] | Checkpoint, model: str | None = None
) -> tuple[DenseNet, Checkpoint]:
    """The model a weights source holds, with the source's metadata.

    A self-describing file (one written by :func:`save_weights`) rebuilds its model alone; a file
    that does not say which architecture it holds (a torchvision checkpoint) needs the preset
    ``model``. Given both, the file must hold that preset's architecture.
    """
    if model is not None:
        checkpoint = _read_weights(model, source)  # a published name of the preset, too
        return create_model(model, weights=checkpoint), checkpoint  # type: ignore[return-value]
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if checkpoint.config is None:
        raise WeightsError(
            f"{checkpoint.source} carries no model config: pass --model NAME (see "
            "`densenet list`; in Python, load_model(source, model=NAME))"
        )
    return fitted_model(checkpoint.config, checkpoint), checkpoint


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for images: the network, how its inputs are made, what its outputs mean."""

    model: DenseNet
    preprocessing: Preprocessing
    class_names: list[str] | None
    checkpoint: Checkpoint

    @property
    def multilabel(self) -> bool:
        """Trained with a sigmoid per class (several findings per image), not one softmax."""
        return self.checkpoint.meta.get("task") == "multilabel"


def load_for_inference(
    source: str | os.PathLike[str] | Checkpoint, model: str | None = None
) -> LoadedModel:
    """:func:`load_model` plus the preprocessing and class names the weights go with.

    The preprocessing a file records is what its weights were trained with, so it wins over the
    preset's, which serves files that record none (a torchvision checkpoint).
    """
    network, checkpoint = load_model(source, model)
    preprocessing = checkpoint.preprocessing
    if preprocessing is None:
        if model is None:
            raise ConfigError(
                f"{checkpoint.source} does not record how to preprocess images; say which preset "
                "it is with --model NAME"
            )
        preprocessing = get_spec(model).preprocessing
    return LoadedModel(network, preprocessing, checkpoint.class_names, checkpoint)


def fitted_model(config: DenseNetConfig, checkpoint: Checkpoint) -> DenseNet:
    """The network ``config`` describes holding the checkpoint's tensors, or one ``WeightsError``.

    The config may come from the file itself, so it is compared with the tensors before anything
    is allocated for it: a 190 KB file must not make this build a network of gigabytes.
    """
    layers = sum(config.block_config)
    # Each dense layer has 5 tensors or more, so more layers than the file has tensors cannot fit.
    # Past this check, building the model shapes-only costs at most a multiple of the file's size.
    if layers > len(checkpoint.state_dict):
        raise WeightsError(
            f"weights in {checkpoint.source} do not fit the model: block_config "
            f"{list(config.block_config)} asks for {layers} dense layers, but the file holds only "
            f"{len(checkpoint.state_dict)} tensors"
        )
    # A shapeless copy gives the expected keys and shapes without allocating any of the (possibly
    # huge) tensors the config describes.
    with torch.device("meta"):
        skeleton = DenseNet(config)
    state_dict = fitted_state_dict(skeleton.state_dict(), checkpoint.state_dict, checkpoint.source)
    model = DenseNet(config)
    model.load_state_dict(state_dict)
    return model


def _check_same_architecture(wanted: DenseNetConfig, stored: DenseNetConfig, source: str) -> None:
    # The head size, dropout and training memory mode may legitimately differ; nothing else may.
    ignore = {"num_classes", "drop_rate", "memory_efficient"}
    wanted_fields, stored_fields = wanted.to_dict(), stored.to_dict()
    different = [
        f"{key}={stored_fields[key]!r} (model has {wanted_fields[key]!r})"
        for key in wanted_fields
        if key not in ignore and wanted_fields[key] != stored_fields[key]
    ]
    if different:
        raise WeightsError(f"{source} holds a different architecture: {', '.join(different)}")
