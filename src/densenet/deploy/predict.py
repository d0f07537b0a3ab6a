"""Classifying image files with a trained model and the preprocessing it was trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from densenet.errors import ConfigError, DenseNetError
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (label, probability), most likely first


def load_image(
    path: str | os.PathLike[str], preprocessing: Preprocessing, in_channels: int
) -> Tensor:
    """Read an image file and turn it into one normalised network input of shape (C, H, W)."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if in_channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DenseNetError(f"cannot read image {os.fspath(path)}: {error}") from None
    if in_channels not in (1, 3):
        raise DenseNetError(f"images can feed 1- or 3-channel models, this one has {in_channels}")
    x = TF.pil_to_tensor(image)
    interpolation = InterpolationMode(preprocessing.interpolation)
    x = TF.resize(x, [preprocessing.resize_size], interpolation=interpolation, antialias=True)
    x = TF.center_crop(x, [preprocessing.input_size])
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, list(preprocessing.mean), list(preprocessing.std))


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
