"""Training recipes: a typed config, the paper's recipes as TOML files, and command-line overrides.

A recipe is a flat TOML file whose keys are the fields of :class:`TrainConfig`, plus an optional
``[model_overrides]`` table of :class:`~densenet.models.densenet.DenseNetConfig` fields changing
the preset.
Users copy a shipped recipe (or a run's ``config.toml``) and pass its path to ``--recipe``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w

from densenet.errors import ConfigError, brief, check_choice
from densenet.files import atomic_write
from densenet.hardware import MemoryFormatChoice, PrecisionChoice
from densenet.models.presets import MAX_IMAGE_SIZE, Interpolation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Dataset = Literal["digits", "cifar10", "cifar100", "svhn", "imagefolder", "csv"]
DATASETS: tuple[Dataset, ...] = typing.get_args(Dataset)
Augmentation = Literal["none", "crop", "crop_flip", "random_resized_crop_flip"]
AutoAugment = Literal["none", "randaugment", "trivialaugment"]
Task = Literal["auto", "single", "multilabel"]
Schedule = Literal["step", "cosine"]
Optimizer = Literal["sgd", "adamw"]
# The recipe a dataset gets when none is named.
RECIPES = resources.files("densenet.training") / "recipes"
DEFAULT_RECIPES: dict[Dataset, str] = {
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn",
    "imagefolder": "imagenet",
    "csv": "imagenet",
}
# The largest share of a run a warm-up may take: the rest trains at (or decays from) the peak lr.
MAX_WARMUP_SHARE = 0.5
# Settings that may change when a run is resumed: they don't change what is computed.
RESUMABLE_CHANGES = frozenset(
    {"data_dir", "download", "workers", "checkpoint_every", "tensorboard"}
)


def _setting(default: object = dataclasses.MISSING, *, help: str, **options: object) -> Any:
    """A TrainConfig field with its documentation, which `densenet train --help` shows."""
    return field(default=default, metadata={"help": help}, **options)  # type: ignore[call-overload]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults are the paper's CIFAR recipe."""

    dataset: Dataset = _setting(
        "digits", help="the images to train on (digits is built in: no download, a few minutes)"
    )
    data_dir: str = _setting(
        "data", help="where the dataset lives (ImageFolder: DIR/train/CLASS/*, DIR/val/CLASS/*)"
    )
    train_csv: str = _setting(
        "",
        help="csv dataset: the training images' CSV (a path column, relative to data_dir, and "
        "one class column or one 0/1 column per finding)",
    )
    test_csv: str = _setting("", help="csv dataset: the test images' CSV, same columns")
    task: Task = _setting(
        "auto",
        help="single (softmax, one class per image) or multilabel (a sigmoid per class, "
        "binary cross-entropy, AUROC); auto: multilabel for CSVs with several label columns",
    )
    pos_weight: Literal["auto", "none"] = _setting(
        "none",
        help="multilabel: weigh each class's positives by its negatives/positives in the training "
        "split (auto), or not (none)",
    )
    grayscale: bool = _setting(
        False,
        help="ImageFolder/csv: read images as one channel (X-rays); RGB --finetune weights get "
        "their first convolution summed over colour, and a 3-value mean/std is averaged",
    )
    download: bool = _setting(
        False, help="fetch the dataset with torchvision's downloaders if it is missing"
    )
    model: str = _setting("densenet_bc100_k12", help="model preset (see `densenet list`)")
    model_overrides: dict[str, object] = _setting(
        help="fields of the preset to change, e.g. growth_rate=24 or block_config=[4,4,4] (the "
        "dataset sets in_channels and num_classes, drop_rate is its own setting)",
        default_factory=dict,
    )
    drop_rate: float = _setting(
        0.0, help="dropout after each convolution (the paper: 0.2 without augmentation)"
    )
    memory_efficient: bool = _setting(
        False,
        help="dense blocks with activation memory linear in depth: same results, far less memory",
    )
    finetune: str = _setting(
        "",
        help="start from these weights: a file, URL or published name (see README); the head is "
        "re-initialised when the number of classes differs",
    )
    freeze_backbone: bool = _setting(False, help="with --finetune: train only the classifier")
    backbone_lr_scale: float = _setting(
        1.0,
        help="with --finetune: the backbone learns at lr times this (fine-tuning often wants it "
        "smaller)",
    )
    epochs: int = _setting(300, help="passes over the training set")
    batch_size: int = _setting(
        64, help="global batch size (with several processes each takes an equal slice)"
    )
    optimizer: Optimizer = _setting(
        "sgd", help="sgd (the paper's) or adamw (decoupled weight decay, usual for fine-tuning)"
    )
    lr: float = _setting(0.1, help="learning rate at the start (the peak, after any warm-up)")
    momentum: float = _setting(0.9, help="SGD momentum")
    nesterov: bool = _setting(True, help="Nesterov momentum (SGD)")
    weight_decay: float = _setting(
        1e-4, help="weight decay (SGD: L2 penalty in the gradient; AdamW: decoupled)"
    )
    decay_bn_bias: bool = _setting(
        True,
        help="apply weight decay to BatchNorm weights and biases too (the paper does; "
        "--no-decay-bn-bias exempts them, as timm and torchvision recipes do)",
    )
    schedule: Schedule = _setting(
        "step",
        help="step (the paper's: lr times lr_gamma at each milestone, per epoch) or cosine "
        "(from lr to 0 over the run, per optimizer step)",
    )
    warmup_epochs: float = _setting(
        0.0,
        help="epochs over which the lr rises linearly from ~0 to lr, per optimizer step (at most "
        "half the run: a shorter run shortens it, and says so)",
    )
    lr_milestones: tuple[float, ...] = _setting(
        (0.5, 0.75), help="fractions of the run at which the lr is multiplied by lr_gamma"
    )
    lr_gamma: float = _setting(0.1, help="what the lr is multiplied by at each milestone")
    label_smoothing: float = _setting(
        0.0,
        help="share of each target spread evenly over all classes (0: one-hot targets); "
        "multilabel: each 0/1 target t becomes t(1-e) + e/2",
    )
    accumulate: int = _setting(
        1,
        help="optimizer step every N batches of batch_size, each adding its share of the "
        "gradient (effective batch: N x batch_size; the last step of an epoch may take fewer)",
    )
    clip_grad_norm: float = _setting(
        0.0, help="scale gradients down to this total L2 norm before each step (0: off)"
    )
    ema_decay: float = _setting(
        0.0,
        help="keep an exponential moving average of the weights with this decay per optimizer "
        "step, evaluated every epoch and saved as ema.safetensors (0: off; e.g. 0.999)",
    )
    mixup_alpha: float = _setting(
        0.0, help="mixup: blend each image with another, share ~ Beta(alpha, alpha) (0: off)"
    )
    cutmix_alpha: float = _setting(
        0.0,
        help="cutmix: paste a box of another image, area share ~ Beta(alpha, alpha) (0: off; "
        "with mixup too, each batch takes one of them at random)",
    )
    augment: Augmentation = _setting(
        "crop_flip",
        help="training augmentation: none, crop (pad + random crop), crop_flip (and mirror), "
        "random_resized_crop_flip (ImageFolder only)",
    )
    crop_padding: int = _setting(4, help="zero padding on each side before a random crop, in px")
    auto_augment: AutoAugment = _setting(
        "none",
        help="after the crop and flip, per image: randaugment (torchvision's RandAugment: 2 ops "
        "at magnitude 9) or trivialaugment (TrivialAugmentWide: 1 op, random magnitude); "
        "in-memory datasets are augmented image by image on the device, as image files are",
    )
    random_erasing: float = _setting(
        0.0,
        help="probability that an image gets one rectangle (0.02 to 1/3 of its area, aspect "
        "ratio 0.3 to 3.3) set to 0 after normalisation, i.e. to the mean (0: off; e.g. "
        "the DeiT ImageNet recipe: 0.25)",
    )
    svhn_extra: bool = _setting(
        True, help="SVHN only: train on train + extra (the paper's 604,388 images)"
    )
    mean: tuple[float, ...] = _setting(
        (), help="per-channel mean on the 0-1 scale (default: measured on the training set)"
    )
    std: tuple[float, ...] = _setting(
        (),
        help="per-channel standard deviation on the 0-1 scale (default: measured on the training "
        "set)",
    )
    input_size: int = _setting(
        0, help="network input side in px (0: 224 for ImageFolder data, else the images' size)"
    )
    resize_size: int = _setting(
        0,
        help="evaluation resize of the short side before the centre crop (0: input_size / 0.875 "
        "for ImageFolder data, else the images' size)",
    )
    interpolation: Interpolation = _setting(
        "bilinear", help="resampling filter for resizing ImageFolder images"
    )
    seed: int = _setting(0, help="seeds initialisation, data order, augmentation and dropout")
    precision: PrecisionChoice = _setting(
        "auto", help="autocast precision (auto: bf16 on AMX CPUs and Ampere+ GPUs, else fp32)"
    )
    memory_format: MemoryFormatChoice = _setting(
        "auto", help="activation layout (auto: channels_last, but contiguous for fp32 on GPUs)"
    )
    device: str = _setting("auto", help="auto, cpu, cuda or cuda:N")
    workers: int = _setting(
        4, help="DataLoader worker processes (ImageFolder only; in-memory datasets need none)"
    )
    checkpoint_every: int = _setting(
        0, help="also checkpoint every N optimizer steps (0: at the end of each epoch only)"
    )
    tensorboard: bool = _setting(
        False,
        help="write TensorBoard event files to RUN/tensorboard: train loss, top-1, lr and img/s "
        "per step, every metrics.csv column and the curves per epoch (pip install "
        "'densenet[tensorboard]')",
    )
    deterministic: bool = _setting(
        False, help="deterministic algorithms only (bitwise-reproducible runs, may be slower)"
    )
    compile: bool = _setting(
        False,
        help="torch.compile the network for training: faster steps once compiled, but the first "
        "steps are slower while it compiles (the time is printed); results differ from an "
        "uncompiled run by rounding",
    )
    sync_bn: bool = _setting(
        False,
        help="with several processes (torchrun): BatchNorm statistics over the global batch, not "
        "each process's share",
    )

    def __post_init__(self) -> None:
        for name in ("lr_milestones", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        self.validate()

    def validate(self) -> None:
        for name, kind in FIELD_TYPES.items():
            if typing.get_origin(kind) is Literal:
                check_choice(name, getattr(self, name), typing.get_args(kind))
        for name, (within, domain) in _DOMAINS.items():
            value = getattr(self, name)
            if not within(value):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{name} must be {domain}, got {brief(shown)}")
        csv_data = self.dataset == "csv"
        if csv_data != bool(self.train_csv and self.test_csv) and (
            csv_data or self.train_csv or self.test_csv
        ):
            raise ConfigError(
                "--train-csv and --test-csv go together with --dataset csv: give all three"
            )
        if self.grayscale and self.dataset not in ("imagefolder", "csv"):
            raise ConfigError(
                f"--grayscale reads image files as one channel; {self.dataset} has fixed channels"
            )
        if self.task == "multilabel" and not csv_data:
            raise ConfigError(
                f"--task multilabel needs labels per finding: use --dataset csv (not "
                f"{self.dataset})"
            )
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0: set --momentum or add --no-nesterov")
        if self.freeze_backbone and not self.finetune:
            raise ConfigError("freeze_backbone needs pretrained weights: add --finetune SOURCE")
        if self.freeze_backbone and self.memory_efficient:
            raise ConfigError(
                "a frozen backbone needs no activation memory for its gradients: drop "
                "--memory-efficient or --freeze-backbone"
            )
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"mean and std must have one value per channel each, got {len(self.mean)} and "
                f"{len(self.std)}"
            )
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

    @property
    def warmup_epochs_used(self) -> float:
        """The warm-up the schedule applies: ``warmup_epochs``, shortened to
        ``MAX_WARMUP_SHARE`` of a run too short for it."""
        # A recipe's warm-up stays usable for `--epochs 1`; the config keeps the value asked for,
        # so a resumed run and its config.toml are exact, and the run's first line says so.
        return min(self.warmup_epochs, MAX_WARMUP_SHARE * self.epochs)

    def lr_factor(self, update: int, updates_per_epoch: int) -> float:
        """The lr of optimizer step ``update`` (0-based, counted over the run) over ``lr``."""
        warmup = self.warmup_epochs_used * updates_per_epoch
        # The first step already learns (at lr / warmup steps), as in timm; none is wasted at 0.
        ramp = min(1.0, (update + 1) / warmup) if warmup else 1.0
        if self.schedule == "step":
            return ramp * self.lr_at(update // updates_per_epoch) / self.lr
        total = self.epochs * updates_per_epoch
        progress = (update - warmup) / max(total - warmup, 1)
        return ramp * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def lr_at(self, epoch: int) -> float:
        """The step schedule: lr times gamma for every milestone epoch already reached."""
        # Never at epoch 0: with few epochs a milestone would round there and the run would start
        # at a decayed lr.
        passed = sum(epoch >= max(1, round(m * self.epochs)) for m in self.lr_milestones)
        return self.lr * self.lr_gamma**passed


def _increasing_fractions(values: tuple[float, ...]) -> bool:
    return all(0 < m < 1 for m in values) and all(a < b for a, b in itertools.pairwise(values))


# The numeric settings' valid values, and how a message states them. NaN fails every comparison,
# so it is refused too.
_DOMAINS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda n: n >= 1, ">= 1"),
    "batch_size": (lambda n: n >= 1, ">= 1"),
    "crop_padding": (lambda n: n >= 0, ">= 0"),
    "workers": (lambda n: n >= 0, ">= 0"),
    "checkpoint_every": (lambda n: n >= 0, ">= 0"),
    "input_size": (lambda n: 0 <= n <= MAX_IMAGE_SIZE, f"in [0, {MAX_IMAGE_SIZE}] px (0: auto)"),
    "resize_size": (lambda n: 0 <= n <= MAX_IMAGE_SIZE, f"in [0, {MAX_IMAGE_SIZE}] px (0: auto)"),
    "lr": (lambda x: 0 < x < math.inf, "a finite number > 0"),
    "momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "weight_decay": (lambda x: 0 <= x < math.inf, "a finite number >= 0"),
    "lr_milestones": (_increasing_fractions, "increasing fractions of the run, each in (0, 1)"),
    "lr_gamma": (lambda x: 0 < x <= 1, "in (0, 1]"),
    "warmup_epochs": (lambda x: 0 <= x < math.inf, "a finite number >= 0"),
    "label_smoothing": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "accumulate": (lambda n: n >= 1, ">= 1"),
    "clip_grad_norm": (lambda x: 0 <= x < math.inf, "a finite number >= 0 (0: off)"),
    "ema_decay": (lambda x: 0 <= x < 1, "in [0, 1) (0: off)"),
    "mixup_alpha": (lambda x: 0 <= x < math.inf, "a finite number >= 0 (0: off)"),
    "cutmix_alpha": (lambda x: 0 <= x < math.inf, "a finite number >= 0 (0: off)"),
    "drop_rate": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "random_erasing": (lambda x: 0 <= x <= 1, "in [0, 1] (0: off)"),
    "backbone_lr_scale": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "mean": (lambda xs: all(math.isfinite(x) for x in xs), "finite numbers"),
    "std": (lambda xs: all(0 < x < math.inf for x in xs), "finite numbers > 0"),
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: object) -> object:
    """``value`` converted to the field's type, or a ConfigError naming the field."""
    kind = FIELD_TYPES[name]
    origin = typing.get_origin(kind)
    if origin is Literal:  # its values are strings; TrainConfig.validate checks which
        return _check_scalar(name, value, str)
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
    # A shipped recipe's bare name wins over a file or folder of that name in the working
    # directory (say a "digits" data folder): "./digits" names the path.
    shipped = name_or_path in list_recipes()
    if shipped:
        data = (RECIPES / f"{name_or_path}.toml").read_bytes()
    elif path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ConfigError(f"cannot read recipe {path}: {error.strerror or error}") from None
    else:
        raise ConfigError(
            f"unknown recipe {name_or_path!r}: give a .toml path or one of "
            f"{', '.join(list_recipes())}"
        )
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"recipe {name_or_path} is not UTF-8 text (byte {data[error.start]:#x} at offset "
            f"{error.start}), which TOML requires: save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"recipe {name_or_path} is not valid TOML: {error}") from None


def resolve(recipe: str | None, overrides: dict[str, object]) -> TrainConfig:
    """The recipe (named, or the dataset's default) with ``overrides`` applied on top."""
    if recipe is None:
        dataset = overrides.get("dataset", TrainConfig.dataset)
        recipe = DEFAULT_RECIPES.get(str(dataset), "digits")
    settings = read_recipe(recipe)
    from_recipe = _check_type("model_overrides", settings.pop("model_overrides", {}))
    model_overrides = {
        **from_recipe,  # type: ignore[dict-item]
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
