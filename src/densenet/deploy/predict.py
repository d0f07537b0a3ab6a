"""Classifying image files with a trained model and the preprocessing it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from densenet.data.images import eval_transform, read_image
from densenet.data.loaders import Normalize
from densenet.errors import ConfigError, DatasetError, DenseNetError
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (label, probability), most likely first


def load_image(
    path: str | os.PathLike[str], preprocessing: Preprocessing, in_channels: int
) -> Tensor:
    """Read an image file and turn it into one normalised network input of shape (C, H, W).

    The decoding, resize and crop are evaluation's (:mod:`densenet.data.images`), and so is the
    normalisation: a file gets the same input here as in ``densenet eval``.
    """
    image = read_image(path, in_channels)
    try:
        image = eval_transform(preprocessing)(image)
    except DatasetError as error:  # too large once resized
        raise DatasetError(f"cannot use image {os.fspath(path)}: {error}") from None
    return Normalize(preprocessing.mean, preprocessing.std)(image[None])[0]


class Predictor:
    """A model in eval mode together with how its inputs are made and what its outputs mean."""

    def __init__(
        self, model: DenseNet, preprocessing: Preprocessing, class_names: list[str] | None = None
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

    @torch.inference_mode()
    def predict(
        self, paths: list[str | os.PathLike[str]], top_k: int = 5, batch_size: int = 32
    ) -> list[Prediction]:
        # Every file is read before anything is computed, so a bad file fails the whole call early.
        inputs = [load_image(p, self.preprocessing, self.model.config.in_channels) for p in paths]
        k = min(top_k, len(self.class_names))
        predictions = []
        for start in range(0, len(inputs), batch_size):
            batch = torch.stack(inputs[start : start + batch_size])
            probabilities = self.model(batch).float().softmax(dim=1)
            values, indices = probabilities.topk(k, dim=1)
            for offset, (row_values, row_indices) in enumerate(zip(values, indices, strict=True)):
                top = [
                    (self.class_names[i], float(v))
                    for v, i in zip(row_values.tolist(), row_indices.tolist(), strict=True)
                ]
                predictions.append(Prediction(Path(paths[start + offset]), top))
        return predictions
