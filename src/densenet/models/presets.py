"""The paper's networks: one table holding each preset's architecture and metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from densenet.errors import ConfigError, brief
from densenet.models.densenet import DenseNetConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Paper section 4.2 / the authors' code, on the 0-255 scale.
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
# The filters torchvision resizes uint8 image tensors with (densenet.data.images).
Interpolation = Literal["bilinear", "bicubic", "nearest", "nearest-exact"]
INTERPOLATIONS: tuple[Interpolation, ...] = get_args(Interpolation)
# The largest network input or resize side (px) taken from a file or a flag. Far above what
# classification uses (224-600), and still small enough to run: an input side decides the memory
# of every activation (a 100000 px resize asks for 40 GB).
MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: resize the short side, centre crop, normalise."""

    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Interpolation = "bilinear"

    def gray(self) -> Preprocessing:
        """The same for one-channel images: a gray value stands for equal R, G and B, so it is
        normalised by the channels' average mean and std."""
        return replace(
            self,
            mean=(round(sum(self.mean) / len(self.mean), 6),),
            std=(round(sum(self.std) / len(self.std), 6),),
        )

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)):
                raise ConfigError(
                    f"preprocessing.{name} must be a list of numbers, got {brief(values)}"
                )
            object.__setattr__(self, name, tuple(values))
        self.validate()

    def validate(self) -> None:
        for name in ("input_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"preprocessing.{name} must be an integer >= 1, got {brief(value)}"
                )
            if value > MAX_IMAGE_SIZE:
                raise ConfigError(
                    f"preprocessing.{name} is {value} px, more than the {MAX_IMAGE_SIZE} allowed"
                )
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(
                "preprocessing.mean and preprocessing.std must hold one number per channel, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        for name, low in (("mean", -math.inf), ("std", 0.0)):
            for i, value in enumerate(getattr(self, name)):
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not (number and math.isfinite(value) and value > low):
                    bound = "a finite number" if name == "mean" else "a finite number > 0"
                    raise ConfigError(
                        f"preprocessing.{name}[{i}] must be {bound}, got {brief(value)}"
                    )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                f"{brief(self.interpolation)}"
            )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: object) -> Preprocessing:
        """The preprocessing ``data`` (as written by :meth:`to_dict`) describes, checked."""
        if not isinstance(data, dict):
            raise ConfigError(f"preprocessing must be a JSON object, got {brief(data)}")
        missing = [key for key in ("input_size", "resize_size", "mean", "std") if key not in data]
        if missing:
            raise ConfigError(f"preprocessing lacks {', '.join(missing)}")
        return cls(
            input_size=data["input_size"],
            resize_size=data["resize_size"],
            mean=data["mean"],
            std=data["std"],
            interpolation=data.get("interpolation", "bilinear"),
        )


IMAGENET_PREPROCESSING = Preprocessing(224, 256, IMAGENET_MEAN, IMAGENET_STD)
CIFAR_PREPROCESSING = Preprocessing(32, 32, CIFAR10_MEAN, CIFAR10_STD)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: DenseNetConfig
    preprocessing: Preprocessing
    description: str
    # Error rates (%) reported in the paper, keyed by benchmark ("top1", "C10+", "SVHN", ...).
    paper_error: dict[str, float] = field(default_factory=dict)


def _imagenet(name: str, k: int, blocks: tuple[int, ...], stem: int, errors: dict[str, float]):
    config = DenseNetConfig(growth_rate=k, block_config=blocks, num_init_features=stem)
    # The paper names these by depth (DenseNet-264 has 2*130 + 5 weighted layers, yet is "264").
    depth = name.removeprefix("densenet")
    return ModelSpec(
        name, config, IMAGENET_PREPROCESSING, f"DenseNet-BC-{depth} (k={k}), ImageNet", errors
    )


def _cifar(depth: int, k: int, bc: bool, errors: dict[str, float]) -> ModelSpec:
    # Depth counts the stem conv, 2 transitions, classifier and every conv of the three blocks.
    convs_per_layer = 2 if bc else 1
    layers_per_block = (depth - 4) // (3 * convs_per_layer)
    config = DenseNetConfig(
        growth_rate=k,
        block_config=(layers_per_block,) * 3,
        num_init_features=2 * k if bc else 16,
        bn_size=4 if bc else 0,
        compression=0.5 if bc else 1.0,
        num_classes=10,
        stem="cifar",
    )
    kind = "DenseNet-BC" if bc else "DenseNet"
    name = f"densenet{'_bc' if bc else ''}{depth}_k{k}"
    return ModelSpec(
        name, config, CIFAR_PREPROCESSING, f"{kind} L={depth} k={k}, CIFAR/SVHN", errors
    )


def _table2(c10, c10p, c100, c100p, svhn) -> dict[str, float]:
    values = {"C10": c10, "C10+": c10p, "C100": c100, "C100+": c100p, "SVHN": svhn}
    return {key: value for key, value in values.items() if value is not None}


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _imagenet("densenet121", 32, (6, 12, 24, 16), 64, {"top1": 25.02, "top5": 7.71}),
        _imagenet("densenet161", 48, (6, 12, 36, 24), 96, {"top1": 22.2}),
        _imagenet("densenet169", 32, (6, 12, 32, 32), 64, {"top1": 23.80, "top5": 6.85}),
        _imagenet("densenet201", 32, (6, 12, 48, 32), 64, {"top1": 22.58, "top5": 6.34}),
        _imagenet("densenet264", 32, (6, 12, 64, 48), 64, {"top1": 22.15, "top5": 6.12}),
        _cifar(40, 12, False, _table2(7.00, 5.24, 27.55, 24.42, 1.79)),
        _cifar(100, 12, False, _table2(5.77, 4.10, 23.79, 20.20, 1.67)),
        _cifar(100, 24, False, _table2(5.83, 3.74, 23.42, 19.25, 1.59)),
        _cifar(100, 12, True, _table2(5.92, 4.51, 24.15, 22.27, 1.76)),
        _cifar(250, 24, True, _table2(5.19, 3.62, 19.64, 17.60, 1.74)),
        _cifar(190, 40, True, _table2(None, 3.46, None, 17.18, None)),
    )
}
