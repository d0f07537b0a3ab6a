"""Training recipes: a typed config, the paper's recipes as TOML files, and command-line overrides.

A recipe is a flat TOML file whose keys are the fields of :class:`TrainConfig`, plus an optional
``[model_overrides]`` table of :class:`~densenet.models.densenet.DenseNetConfig` fields changing
the preset.
Users copy a shipped recipe (or a run's ``config.toml``) and pass its path to ``--recipe``.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomli_w

from densenet.errors import ConfigError
from densenet.files import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")
AUGMENTATIONS = ("none", "crop", "crop_flip", "random_resized_crop_flip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# The recipe a dataset gets when none is named.
RECIPES = resources.files("densenet.training") / "recipes"
DEFAULT_RECIPES = {
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn",
    "imagefolder": "imagenet",
}
# Settings that may change when a run is resumed: they don't change what is computed.
RESUMABLE_CHANGES = frozenset({"data_dir", "download", "workers", "checkpoint_every"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults are the paper's CIFAR recipe."""

    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    model: str = "densenet_bc100_k12"
    # DenseNetConfig fields that differ from the preset (the data sets in_channels, num_classes).
    model_overrides: dict[str, object] = field(default_factory=dict)
    drop_rate: float = 0.0
    # Linear-memory dense blocks (densenet.models.efficient): same results, far less activation
    # memory.
    memory_efficient: bool = False
    # Start from these weights (file, URL or published name); the head is re-initialised when the
    # number of classes differs.
    finetune: str = ""
    freeze_backbone: bool = False
    # The backbone learns at lr * backbone_lr_scale (fine-tuning often wants it smaller).
    backbone_lr_scale: float = 1.0
    epochs: int = 300
    # The global batch: with several processes each one takes an equal slice of it.
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    # The learning rate is multiplied by lr_gamma at each of these fractions of the epochs.
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    augment: str = "crop_flip"
    crop_padding: int = 4
    # SVHN only: train on train + extra (the paper's 604,388 images).
    svhn_extra: bool = True
    # Per-channel normalisation on the 0-1 scale; empty means "measure it on the training set".
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # Network input size and evaluation resize for ImageFolder data; 0 means the images' own size.
    input_size: int = 0
    resize_size: int = 0
    interpolation: str = "bilinear"
    seed: int = 0
    precision: str = "auto"
    memory_format: str = "auto"
    device: str = "auto"
    # DataLoader worker processes (ImageFolder only; in-memory datasets need none).
    workers: int = 4
    # Also checkpoint every N optimizer steps (0: only at the end of each epoch).
    checkpoint_every: int = 0
    deterministic: bool = False
    # With several processes: BatchNorm statistics over the global batch, not each process's share.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        for name in ("lr_milestones", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        self.validate()

    def validate(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(
                    f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}"
                )

        choice("dataset", DATASETS)
        choice("augment", AUGMENTATIONS)
        choice("precision", PRECISIONS)
        choice("memory_format", MEMORY_FORMATS)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("crop_padding", "workers", "checkpoint_every", "input_size", "resize_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not all(0 < m <= 1 for m in self.lr_milestones):
            raise ConfigError(
                f"lr_milestones are fractions of the run in (0, 1], got {list(self.lr_milestones)}"
            )
        if not 0.0 <= self.backbone_lr_scale <= 1.0:
            raise ConfigError(f"backbone_lr_scale must be in [0, 1], got {self.backbone_lr_scale}")
        if self.freeze_backbone and not self.finetune:
            raise ConfigError("freeze_backbone needs pretrained weights: add --finetune SOURCE")
        if self.freeze_backbone and self.memory_efficient:
            raise ConfigError(
                "a frozen backbone needs no activation memory for its gradients: drop "
                "--memory-efficient or --freeze-backbone"
            )
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError("mean and std must have one value per channel, and std > 0")
        fixed_by_data = {"in_channels", "num_classes", "drop_rate"} & set(self.model_overrides)
        if fixed_by_data:
            raise ConfigError(
                f"model_overrides may not set {', '.join(sorted(fixed_by_data))}: the dataset "
                "sets in_channels and num_classes, and drop_rate is its own setting"
            )

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        for name in ("lr_milestones", "mean", "std"):
            data[name] = list(data[name])
        return data

    def replace(self, **changes: object) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})

    def lr_at(self, epoch: int) -> float:
        """The step schedule: lr times gamma for every milestone epoch already reached."""
        passed = sum(epoch >= round(m * self.epochs) for m in self.lr_milestones)
        return self.lr * self.lr_gamma**passed


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: object) -> object:
    """``value`` converted to the field's type, or a ConfigError naming the field."""
    kind = FIELD_TYPES[name]
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
        return tuple(_check_scalar(name, v, float) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of model config fields, got {value!r}")
        return value
    return _check_scalar(name, value, kind)


def _check_scalar(name: str, value: object, kind: type) -> object:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is not bool and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{name} must be of type {kind.__name__}, got {value!r}")
    return value


def from_dict(data: dict[str, object]) -> TrainConfig:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}"
        )
    return TrainConfig(**{key: _check_type(key, value) for key, value in data.items()})


def list_recipes() -> list[str]:
    names = (path.name for path in RECIPES.iterdir())
    return sorted(name.removesuffix(".toml") for name in names if name.endswith(".toml"))


def read_recipe(name_or_path: str) -> dict[str, object]:
    """The settings of a shipped recipe (by name) or of a TOML file (by path)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        text = path.read_text()
    elif name_or_path in list_recipes():
        text = (RECIPES / f"{name_or_path}.toml").read_text()
    else:
        raise ConfigError(
            f"unknown recipe {name_or_path!r}: give a .toml path or one of "
            f"{', '.join(list_recipes())}"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"recipe {name_or_path} is not valid TOML: {error}") from None


def resolve(recipe: str | None, overrides: dict[str, object]) -> TrainConfig:
    """The recipe (named, or the dataset's default) with ``overrides`` applied on top."""
    if recipe is None:
        dataset = overrides.get("dataset", TrainConfig.dataset)
        recipe = DEFAULT_RECIPES.get(str(dataset), "digits")
    settings = read_recipe(recipe)
    model_overrides = {
        **settings.pop("model_overrides", {}),  # type: ignore[dict-item]
        **overrides.pop("model_overrides", {}),  # type: ignore[dict-item]
    }
    return from_dict({**settings, **overrides, "model_overrides": model_overrides})


def check_resume_overrides(saved: TrainConfig, overrides: dict[str, object]) -> TrainConfig:
    """``saved`` with the allowed changes applied; anything that changes the maths is refused."""
    changed = sorted(
        key
        for key, value in overrides.items()
        if key not in RESUMABLE_CHANGES and _check_type(key, value) != getattr(saved, key)
    )
    if changed:
        details = ", ".join(
            f"{key} {getattr(saved, key)!r} -> {overrides[key]!r}" for key in changed
        )
        raise ConfigError(
            f"cannot resume with different settings ({details}); resume without them, or start "
            "a new run with --out"
        )
    return saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE_CHANGES})


def save_config(config: TrainConfig, path: Path) -> None:
    text = "# The resolved settings of this run; `densenet train --recipe` accepts this file.\n"
    text += tomli_w.dumps(config.to_dict())
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_config(path: Path) -> TrainConfig:
    return from_dict(read_recipe(str(path)))
