"""Everything a run needs before its first step: its data, its resolved config, the network and
what updates it, and its batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from densenet.data.datasets import (
    Data,
    FolderData,
    TensorData,
    channel_stats,
    download,
    load_split,
)
from densenet.data.loaders import FolderBatches, Shard, TensorBatches, make_batches
from densenet.errors import CheckpointError, ConfigError, DatasetError
from densenet.hardware import resolve_device, resolve_precision_and_format
from densenet.models.batchnorm import convert_sync_batchnorm
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing
from densenet.training.config import RESUMABLE_CHANGES, TrainConfig
from densenet.training.ema import WeightAverage
from densenet.training.finetune import freeze_backbone, parameter_groups
from densenet.training.state import SavedRun
from densenet.weights.registry import create_model

# ImageNet's usual ratio of evaluation resize to crop (256 -> 224).
CROP_RATIO = 0.875


@dataclass
class DataSetup:
    train: Data
    test: Data
    class_names: list[str]
    in_channels: int
    multilabel: bool = False


def load_data(config: TrainConfig) -> DataSetup:
    if config.download:
        download(config.dataset, config.data_dir, svhn_extra=config.svhn_extra)
    train = load_split(
        config.dataset,
        config.data_dir,
        "train",
        svhn_extra=config.svhn_extra,
        csv_file=config.train_csv,
        task=config.task,
    )
    multilabel = isinstance(train, FolderData) and train.multilabel
    if config.task == "single" and multilabel:
        raise ConfigError(f"{config.train_csv} is multi-label: use --task multilabel or auto")
    # The test split is read as the training split was: same task, same single-label classes.
    test = load_split(
        config.dataset,
        config.data_dir,
        "test",
        csv_file=config.test_csv,
        task="multilabel" if multilabel else "single",
        class_names=train.class_names,
    )
    if train.class_names != test.class_names:
        raise DatasetError(
            f"the train and test splits of {config.data_dir} have different classes "
            f"({len(train.class_names)} vs {len(test.class_names)}); they must match"
        )
    if isinstance(train, TensorData):
        in_channels = train.images.shape[1]
    else:
        in_channels = 1 if config.grayscale else 3
    setup = DataSetup(train, test, train.class_names, in_channels, multilabel)
    if multilabel and config.pos_weight == "auto":
        positive_weights(setup)  # refuses a class without positives before any run is written
    return setup


def positive_weights(data: DataSetup) -> torch.Tensor:
    """Per class, the training split's negatives over its positives: each class's positives then
    weigh as much in the loss as its negatives, so rare findings are not ignored."""
    assert isinstance(data.train, FolderData)
    labels = torch.tensor([label for _, label in data.train.samples], dtype=torch.float64)
    positives = labels.sum(0)
    for name, count in zip(data.class_names, positives.tolist(), strict=True):
        if count == 0:
            raise DatasetError(
                f"class {name!r} has no positive image in the training split, so it has no "
                "positive weight: add positive examples, drop the column, or use --pos-weight none"
            )
    return ((len(labels) - positives) / positives).float()


def resolve_config(config: TrainConfig, data: DataSetup) -> TrainConfig:
    """Replace every "auto" or empty setting by the value this run uses, for the saved config."""
    device = resolve_device(config.device)
    precision, memory_format = resolve_precision_and_format(
        device, config.precision, config.memory_format
    )
    changes: dict[str, object] = {
        "device": str(device),
        "precision": precision,
        "memory_format": memory_format,
    }
    if isinstance(data.train, TensorData):
        size = data.train.images.shape[-1]
        if config.input_size not in (0, size) or config.resize_size not in (0, size):
            raise ConfigError(
                f"{config.dataset} images are {size}x{size}; input_size and resize_size can't "
                "change that"
            )
        changes["input_size"] = changes["resize_size"] = size
        if config.augment == "random_resized_crop_flip":
            raise ConfigError(
                f"augment random_resized_crop_flip is for ImageFolder data; {config.dataset} "
                "takes none, crop or crop_flip"
            )
        if not config.mean:
            mean, std = channel_stats(data.train.images)
            changes["mean"], changes["std"] = mean, std
    else:
        if not config.mean:
            raise ConfigError("ImageFolder data needs mean and std (e.g. --mean 0.485 0.456 ...)")
        input_size = config.input_size or 224
        changes["input_size"] = input_size
        changes["resize_size"] = config.resize_size or round(input_size / CROP_RATIO)
    resolved = config.replace(**changes)
    if data.in_channels == 1 and len(resolved.mean) == 3:
        # An RGB recipe's (ImageNet's) statistics, for gray images as fine-tuning sees them.
        gray = preprocessing_of(resolved).gray()
        resolved = resolved.replace(mean=gray.mean, std=gray.std)
    if len(resolved.mean) != data.in_channels:
        raise ConfigError(
            f"mean/std have {len(resolved.mean)} values but the images have {data.in_channels} "
            "channels"
        )
    return resolved


def preprocessing_of(config: TrainConfig) -> Preprocessing:
    return Preprocessing(
        config.input_size, config.resize_size, config.mean, config.std, config.interpolation
    )


def build_model(config: TrainConfig, in_channels: int, num_classes: int) -> DenseNet:
    """The one place a training run's network is made: the preset plus the run's overrides."""
    model = create_model(
        config.model,
        weights=config.finetune or None,
        num_classes=num_classes,
        in_channels=in_channels,
        drop_rate=config.drop_rate,
        memory_efficient=config.memory_efficient,
        **config.model_overrides,
    )
    return freeze_backbone(model) if config.freeze_backbone else model


def weights_meta(config: TrainConfig, data: DataSetup, **extra: object) -> dict[str, object]:
    """What `densenet predict` and `densenet eval` need to use the weights on new images."""
    return {
        "model": None if config.model_overrides else config.model,
        "dataset": config.dataset,
        "class_names": data.class_names,
        "preprocessing": preprocessing_of(config).to_dict(),
        "in_channels": data.in_channels,
        "task": "multilabel" if data.multilabel else "single",
        **extra,
    }


@dataclass
class Learner:
    """The network and everything that updates it; their state dicts are what a run saves."""

    model: DenseNet
    criterion: nn.Module  # the training loss, from logits and the batch's labels or soft targets
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR  # stepped after every optimizer step
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None

    def state_dicts(self) -> dict[str, dict]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else {},
        }


def updates_per_epoch(config: TrainConfig, steps: int) -> int:
    """Optimizer steps in an epoch of ``steps`` batches: a last, shorter accumulation counts."""
    return -(-steps // config.accumulate)


def updates_done(config: TrainConfig, epoch: int, step: int, steps: int) -> int:
    """Optimizer steps taken before batch ``step`` of ``epoch``."""
    return epoch * updates_per_epoch(config, steps) + -(-step // config.accumulate)


def build_optimizer(config: TrainConfig, model: DenseNet) -> torch.optim.Optimizer:
    # TrainConfig.validate has refused every setting SGD would (Nesterov without momentum, ...).
    decay = None if config.decay_bn_bias else config.weight_decay
    groups = parameter_groups(model, config.lr, config.backbone_lr_scale, decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def build_learner(
    config: TrainConfig,
    data: DataSetup,
    device: torch.device,
    saved: SavedRun | None,
    source: str,
    steps: int,
) -> Learner:
    """The run's network, optimizer, lr schedule, loss scaler and weight average, restored from
    ``saved``; ``steps`` is the number of batches an epoch."""
    torch.manual_seed(config.seed)
    model = build_model(config, data.in_channels, len(data.class_names))
    if config.sync_bn:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    if config.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model.config.stage_sizes(config.input_size, config.input_size)  # too small for the blocks?
    optimizer = build_optimizer(config, model)
    # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 don't need it.
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    done = 0
    if saved is not None:
        if saved.model_config != model.config.to_dict():
            raise CheckpointError(f"{source} holds a different model than the run's config.toml")
        _check_same_training(config, saved.config, source)
        model.load_state_dict(saved.learners["model"])
        optimizer.load_state_dict(saved.learners["optimizer"])
        scaler.load_state_dict(saved.learners["scaler"])
        if ema is not None:
            ema.model.load_state_dict(saved.learners["ema"])
        done = updates_done(config, saved.state.epoch, saved.state.step, steps)
    # The schedule scales each group's own lr (a fine-tuned backbone's may be lower). Made after
    # a saved optimizer is restored, it starts at the saved optimizer step.
    per_epoch = updates_per_epoch(config, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: config.lr_factor(update, per_epoch), last_epoch=done - 1
    )
    return Learner(model, criterion_of(config, data, device), optimizer, schedule, scaler, ema)


def criterion_of(config: TrainConfig, data: DataSetup, device: torch.device) -> nn.Module:
    """The training loss: a sigmoid per finding for multi-label data, else softmax over classes."""
    if not data.multilabel:
        return build_criterion(config)
    weights = positive_weights(data).to(device) if config.pos_weight == "auto" else None
    return SmoothedBCEWithLogitsLoss(config.label_smoothing, pos_weight=weights)


class SmoothedBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """Binary cross-entropy per finding, each 0/1 (or mixed) target t taken as
    t (1 - smoothing) + smoothing / 2: label smoothing for independent sigmoids."""

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__(pos_weight=pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        return super().forward(logits, targets)


def build_criterion(config: TrainConfig) -> nn.Module:
    """The single-label loss: cross-entropy, from class indices or (mixup, cutmix) probabilities."""
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def _check_same_training(config: TrainConfig, saved: dict[str, object], source: str) -> None:
    """A resumed run must go on with the settings its state was trained with."""
    current = config.to_dict()
    changed = [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and saved.get(key) != value
    ]
    if changed:
        raise CheckpointError(
            f"config.toml no longer matches {source} ({'; '.join(changed)}): restore it, or start "
            "a new run with these settings"
        )


def build_batches(
    config: TrainConfig, data: DataSetup, device: torch.device, shard: Shard
) -> tuple[TensorBatches | FolderBatches, TensorBatches | FolderBatches]:
    """The training and test batches of this process."""
    common = dict(
        batch_size=config.batch_size,
        device=device,
        preprocessing=preprocessing_of(config),
        in_channels=data.in_channels,
        workers=config.workers,
        seed=config.seed,
        shard=shard,
    )
    train = make_batches(
        data.train,
        train=True,
        augment=config.augment,
        padding=config.crop_padding,
        auto_augment=config.auto_augment,
        **common,
    )
    if len(train) == 0:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(data.train)} training images"
        )
    return train, make_batches(data.test, train=False, **common)
