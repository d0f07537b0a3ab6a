"""Published ImageNet weights for the presets: where each file is, its hash, accuracy and input.

Sources (each figure as its publisher states it):
- torchvision: the ``DenseNet*_Weights.IMAGENET1K_V1`` enums. The hash is the sha256 prefix that
  torchvision puts in the file name and checks on download.
- timm: the ``densenet121.ra_in1k`` pretrained config and timm's ``results-imagenet.csv`` (accuracy
  measured at its test size, 288 px, crop 0.95, bicubic). timm publishes no hash for it.
- Keras: ``keras.applications.densenet`` (URLs and the md5 it checks) and the keras.io applications
  table. Keras states the 224 px input and the "torch" normalisation; the 256 px resize before the
  centre crop is the usual ImageNet protocol, not stated by Keras.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from densenet.errors import WeightsError
from densenet.models.presets import (
    IMAGENET_MEAN,
    IMAGENET_PREPROCESSING,
    IMAGENET_STD,
    Preprocessing,
)

Publisher = Literal["torchvision", "timm", "keras"]


@dataclass(frozen=True)
class PublishedWeights:
    model: str
    tag: str
    publisher: Publisher
    url: str
    # "sha256:<hex prefix>" or "md5:<hex>"; None where the publisher states no hash.
    hash: str | None
    top1: float
    top5: float
    preprocessing: Preprocessing

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"


_TORCHVISION = "https://download.pytorch.org/models/"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
_TIMM_EVAL = Preprocessing(288, 303, IMAGENET_MEAN, IMAGENET_STD, "bicubic")


def _torchvision(model: str, sha256: str, top1: float, top5: float) -> PublishedWeights:
    url = f"{_TORCHVISION}{model}-{sha256}.pth"
    return PublishedWeights(
        model, "tv_in1k", "torchvision", url, f"sha256:{sha256}", top1, top5, IMAGENET_PREPROCESSING
    )


def _keras(model: str, md5: str, top1: float, top5: float) -> PublishedWeights:
    url = f"{_KERAS}{model}_weights_tf_dim_ordering_tf_kernels.h5"
    return PublishedWeights(
        model, "keras_in1k", "keras", url, f"md5:{md5}", top1, top5, IMAGENET_PREPROCESSING
    )


PUBLISHED: dict[str, PublishedWeights] = {
    weights.name: weights
    for weights in (
        _torchvision("densenet121", "a639ec97", 74.434, 91.972),
        _torchvision("densenet161", "8d451a50", 77.138, 93.560),
        _torchvision("densenet169", "b2777c0a", 75.600, 92.806),
        _torchvision("densenet201", "c1103571", 76.896, 93.370),
        PublishedWeights(
            "densenet121",
            "ra_in1k",
            "timm",
            "https://huggingface.co/timm/densenet121.ra_in1k/resolve/main/model.safetensors",
            None,
            76.500,
            93.368,
            _TIMM_EVAL,
        ),
        _keras("densenet121", "9d60b8095a5708f2dcce2bca79d332c7", 75.0, 92.3),
        _keras("densenet169", "d699b8f76981ab1b30698df4c175e90b", 76.2, 93.2),
        _keras("densenet201", "1ceb130c1ea1b78c3bf6114dbdfd8807", 77.3, 93.6),
    )
}


def find_published(model: str, source: str) -> PublishedWeights | None:
    """The entry ``source`` names for ``model`` ("tv_in1k" or "densenet121.tv_in1k"), or None."""
    entry = PUBLISHED.get(source) or PUBLISHED.get(f"{model}.{source}")
    if entry is not None and entry.model != model:
        raise WeightsError(f"published weights {entry.name} are for {entry.model}, not {model}")
    return entry


def unknown_source_error(model: str, source: str) -> WeightsError:
    """The error for a weights source that is neither a file, a URL nor a published name."""
    names = [name for name in PUBLISHED if name.startswith(f"{model}.")]
    close = difflib.get_close_matches(source, [*names, *(n.split(".", 1)[1] for n in names)], 1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    known = ", ".join(n.split(".", 1)[1] for n in names) or "none"
    return WeightsError(
        f"weights {source!r} are not a file, a URL or a published name for {model}{hint} "
        f"(published: {known})"
    )
