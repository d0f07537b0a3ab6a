"""Classifying image files with a trained model and the preprocessing it was trained with."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from densenet.data.images import eval_transform, read_image
from densenet.data.loaders import Normalize
from densenet.errors import ConfigError, DatasetError, DenseNetError
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing


@dataclass(frozen=True)
class Prediction:
    path: Path
    # (label, probability): the most likely first, or for a multi-label model every finding's
    # own probability in class order
    top: list[tuple[str, float]]


def image_files(sources: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files to classify: each file given, and every image file below each folder given.

    Folders are searched recursively, in sorted order, for the image extensions ImageFolder
    knows; links to folders are not followed (they can loop).
    """
    files: list[Path] = []
    for source in map(Path, sources):
        if not source.is_dir():
            files.append(source)
            continue
        found = sorted(
            Path(root) / name
            for root, _, names in os.walk(source)
            for name in names
            if name.lower().endswith(IMG_EXTENSIONS)
        )
        if not found:
            raise DatasetError(
                f"{source} holds no image files ({', '.join(IMG_EXTENSIONS)}); give files or a "
                "folder of images"
            )
        files.extend(found)
    return files


def load_image(
    path: str | os.PathLike[str], preprocessing: Preprocessing, in_channels: int
) -> Tensor:
    """Read an image file and turn it into one normalised network input of shape (C, H, W).

    The decoding, resize and crop are evaluation's (:mod:`densenet.data.images`), and so is the
    normalisation: a file gets the same input here as in ``densenet eval``.
    """
    image = load_cropped_image(path, preprocessing, in_channels)
    return Normalize(preprocessing.mean, preprocessing.std)(image[None])[0]


def load_cropped_image(
    path: str | os.PathLike[str], preprocessing: Preprocessing, in_channels: int
) -> Tensor:
    """The image the network sees, before normalisation: uint8 (C, H, W), resized and cropped."""
    image = read_image(path, in_channels)
    try:
        return eval_transform(preprocessing)(image)
    except DatasetError as error:  # too large once resized
        raise DatasetError(f"cannot use image {os.fspath(path)}: {error}") from None


class Predictor:
    """A model in eval mode together with how its inputs are made and what its outputs mean."""

    def __init__(
        self,
        model: DenseNet,
        preprocessing: Preprocessing,
        class_names: list[str] | None = None,
        multilabel: bool = False,
    ) -> None:
        num_classes, in_channels = model.config.num_classes, model.config.in_channels
        if len(preprocessing.mean) != in_channels:
            raise ConfigError(
                f"the preprocessing normalises {len(preprocessing.mean)} channels but the model "
                f"takes {in_channels}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise DenseNetError(
                f"{len(class_names)} class names for a model with {num_classes} outputs"
            )
        self.model = model.eval()
        self.preprocessing = preprocessing
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        # Findings are not exclusive: each gets its own sigmoid, and all of them are reported.
        self.multilabel = multilabel

    @torch.inference_mode()
    def predict(
        self, paths: Sequence[str | os.PathLike[str]], top_k: int = 5, batch_size: int = 32
    ) -> list[Prediction]:
        """Every file's ``top_k`` labels (a multi-label model: every finding); an unreadable file
        is an error naming it."""
        return [p for batch in self.predict_batches(paths, top_k, batch_size) for p in batch[0]]

    @torch.inference_mode()
    def predict_batches(
        self,
        paths: Sequence[str | os.PathLike[str]],
        top_k: int = 5,
        batch_size: int = 32,
        skip_unreadable: bool = False,
    ) -> Iterator[tuple[list[Prediction], list[Path]]]:
        """Per batch of ``paths``: its predictions and, with ``skip_unreadable``, the files of it
        that could not be read (otherwise the first one is an error). Only one batch of images is
        held at a time, so a folder of any size fits."""
        k = min(top_k, len(self.class_names))
        for start in range(0, len(paths), batch_size):
            inputs, read, skipped = [], [], []
            for path in map(Path, paths[start : start + batch_size]):
                try:
                    inputs.append(
                        load_image(path, self.preprocessing, self.model.config.in_channels)
                    )
                    read.append(path)
                except DatasetError:
                    if not skip_unreadable:
                        raise
                    skipped.append(path)
            if not inputs:
                yield [], skipped
                continue
            logits = self.model(torch.stack(inputs)).float()
            if self.multilabel:
                predictions = [
                    Prediction(path, list(zip(self.class_names, ps, strict=True)))
                    for path, ps in zip(read, logits.sigmoid().tolist(), strict=True)
                ]
                yield predictions, skipped
                continue
            values, indices = logits.softmax(dim=1).topk(k, dim=1)
            predictions = [
                Prediction(path, [(self.class_names[i], v) for v, i in zip(vs, ids, strict=True)])
                for path, vs, ids in zip(read, values.tolist(), indices.tolist(), strict=True)
            ]
            yield predictions, skipped
