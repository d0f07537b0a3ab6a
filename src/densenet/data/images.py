"""Image files to network inputs: one decoder and one set of transforms (torchvision.transforms.v2
on uint8 tensors) for every image the package reads, so that training and evaluation on
ImageFolder data and ``densenet predict`` make the same input from the same file.

An image is unreadable, like a corrupt file, if it has more than :data:`MAX_IMAGE_PIXELS` pixels
or would have once its short side is resized: a 22 KB PNG can hold 14000x13000 pixels, and a strip
of 1x65536 pixels has 4 G pixels once its short side is resized to 256.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from densenet.errors import ConfigError, DatasetError, first_line
from densenet.models.presets import Preprocessing

# 8192x8192: a 45-megapixel camera's photos pass, and decoding one takes at most 192 MB (RGB).
MAX_IMAGE_PIXELS = 8192 * 8192


def read_image(path: str | os.PathLike[str], in_channels: int) -> Tensor:
    """The image in ``path`` as uint8 (C, H, W): grayscale for 1 channel, RGB for 3.

    Any file that cannot be decoded, or that has more than :data:`MAX_IMAGE_PIXELS` pixels, raises
    ``DatasetError`` (callers that skip bad images catch that); a model with another number of
    channels raises ``ConfigError``.
    """
    if in_channels not in (1, 3):
        raise ConfigError(f"images can feed 1- or 3-channel models, this one has {in_channels}")
    try:
        with warnings.catch_warnings():
            # Pillow warns about images past its own limit (89 M pixels) and refuses those past
            # twice it. The check below is this module's own; its refusal is the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # Opening reads the header only: the size is known before any pixel is decoded.
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DatasetError(
                        f"it is {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels allowed "
                        "(densenet.data.images.MAX_IMAGE_PIXELS)"
                    )
                # Cameras store a photo as shot and tag how to turn it upright.
                image = _to_8_bits(ImageOps.exif_transpose(image))
                image = image.convert("L" if in_channels == 1 else "RGB")
    # Pillow's decoders raise many exception types for malformed files (OSError, ValueError,
    # SyntaxError, DecompressionBombError, ...): every one of them means this file is unreadable.
    except Exception as error:
        raise DatasetError(f"cannot read image {os.fspath(path)}: {first_line(error)}") from None
    return TF.pil_to_tensor(image)


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale images scaled to 8 bits: Pillow's conversion clips
    them at 255 instead, which turns nearly every pixel of a 16-bit image white. 32-bit images are
    taken to hold 16-bit values, as Pillow reads some 16-bit files. Floating-point images are
    refused: their values (0-1, Hounsfield units, ...) have no range to map to 8 bits that would
    be right for every file, and Pillow's conversion would clip them."""
    if image.mode == "F":
        raise DatasetError(
            "it holds 32-bit floating-point pixels, which have no fixed range to map to 8 bits: "
            "save it as an 8- or 16-bit PNG, scaled as your data needs"
        )
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    pixels = np.asarray(image, dtype=np.int32).clip(0, 65535)
    # 65535 / 255 = 257, so this rounds to the nearest 8-bit level (never a tie: 257 is odd).
    return Image.fromarray(((pixels + 128) // 257).astype(np.uint8))


class _ResizeLimit:
    """Refuses an image whose short side, resized to ``size``, would make it larger than
    :data:`MAX_IMAGE_PIXELS` (a class, not a closure: DataLoader workers may pickle it)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        if self.size * (self.size * long // short) > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"resizing its short side to {self.size} px would make this {width}x{height} image "
                f"larger than the {MAX_IMAGE_PIXELS} pixels allowed"
            )
        return image


def _resize(preprocessing: Preprocessing) -> list:
    interpolation = InterpolationMode(preprocessing.interpolation)
    return [
        _ResizeLimit(preprocessing.resize_size),
        v2.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True),
    ]


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """Resize the short side, centre crop: the network input is then only normalised.

    An image too large once resized raises ``DatasetError``."""
    return v2.Compose([*_resize(preprocessing), v2.CenterCrop(preprocessing.input_size)])


# torchvision's defaults: RandAugment's 2 ops at magnitude 9 of 31, TrivialAugmentWide's 1 op.
_POLICIES: dict[str, type[v2.Transform]] = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
}


def auto_augment_op(name: str) -> v2.Transform | None:
    """torchvision's policy ``name`` (None for "none"); it draws from torch's global generator."""
    return None if name == "none" else _POLICIES[name]()


def train_transform(
    preprocessing: Preprocessing, augment: str, padding: int, auto_augment: str = "none"
) -> v2.Compose:
    """The augmentation ``augment`` names, then the policy ``auto_augment`` names; their random
    draws come from torch's global generator."""
    steps = _crop_and_flip(preprocessing, augment, padding)
    policy = auto_augment_op(auto_augment)
    return v2.Compose(steps if policy is None else [*steps, policy])


def _crop_and_flip(preprocessing: Preprocessing, augment: str, padding: int) -> list:
    if augment == "none":
        return eval_transform(preprocessing).transforms
    size = preprocessing.input_size
    if augment == "random_resized_crop_flip":
        interpolation = InterpolationMode(preprocessing.interpolation)
        crop = [v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True)]
    else:  # the CIFAR-style crop, after the evaluation resize
        crop = [*_resize(preprocessing), v2.RandomCrop(size, padding=padding)]
    flip = [v2.RandomHorizontalFlip()] if augment.endswith("flip") else []
    return [*crop, *flip]
