"""Image files to network inputs: one decoder and one set of transforms (torchvision.transforms.v2
on uint8 tensors) for every image the package reads, so that training and evaluation on
ImageFolder data and ``densenet predict`` make the same input from the same file.
"""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from densenet.errors import ConfigError, DatasetError, first_line
from densenet.models.presets import Preprocessing


def read_image(path: str | os.PathLike[str], in_channels: int) -> Tensor:
    """The image in ``path`` as uint8 (C, H, W): grayscale for 1 channel, RGB for 3.

    Any file that cannot be decoded raises ``DatasetError`` (callers that skip bad images catch
    that); a model with another number of channels raises ``ConfigError``.
    """
    if in_channels not in (1, 3):
        raise ConfigError(f"images can feed 1- or 3-channel models, this one has {in_channels}")
    try:
        with Image.open(path) as image:
            image = image.convert("L" if in_channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DatasetError(f"cannot read image {os.fspath(path)}: {first_line(error)}") from None
    return TF.pil_to_tensor(image)


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """Resize the short side, centre crop: the network input is then only normalised."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    return v2.Compose(
        [
            v2.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(preprocessing.input_size),
        ]
    )


def train_transform(preprocessing: Preprocessing, augment: str, padding: int) -> v2.Compose:
    """The augmentation ``augment`` names; its random draws come from torch's global generator."""
    if augment == "none":
        return eval_transform(preprocessing)
    interpolation = InterpolationMode(preprocessing.interpolation)
    size = preprocessing.input_size
    if augment == "random_resized_crop_flip":
        crop = [v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True)]
    else:  # the CIFAR-style crop, after the evaluation resize
        crop = [
            v2.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True),
            v2.RandomCrop(size, padding=padding),
        ]
    flip = [v2.RandomHorizontalFlip()] if augment.endswith("flip") else []
    return v2.Compose([*crop, *flip])
