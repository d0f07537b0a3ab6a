"""The training loop: SGD with the paper's step schedule, evaluation every epoch, checkpoints.

Every source of randomness is a pure function of (seed, epoch, step): the data order and
augmentation (see loaders.py) and dropout (the global RNG is re-seeded before each step). Together
with the optimizer state in the checkpoint, this makes a run resumed at any step compute exactly
what the uninterrupted run computes.

Under torchrun each process trains on its slice of every global batch; gradients are averaged by
DistributedDataParallel and the step's loss and accuracy are summed over processes (distributed.py).
The data, and so a run without dropout, do not depend on the number of processes; dropout masks
are drawn per process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from densenet.data.datasets import Data, TensorData, channel_stats, download, load_split
from densenet.data.loaders import Normalize, make_batches, mix_seed
from densenet.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from densenet.hardware import (
    autocast,
    resolve_device,
    resolve_precision_and_format,
    to_memory_format,
)
from densenet.models.batchnorm import convert_sync_batchnorm
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing
from densenet.training.config import TrainConfig
from densenet.training.distributed import (
    all_ranks_agree,
    all_reduce_sum,
    broadcast_buffers,
    current_context,
    data_parallel,
    rank_device,
    stop_together,
    stopped_with_others,
)
from densenet.training.evaluate import evaluate, topk_correct
from densenet.training.finetune import freeze_backbone, parameter_groups
from densenet.training.rundir import RunDirectory
from densenet.weights.registry import create_model

# ImageNet's usual ratio of evaluation resize to crop (256 -> 224).
CROP_RATIO = 0.875


@dataclass
class DataSetup:
    train: Data
    test: Data
    class_names: list[str]
    in_channels: int


def load_data(config: TrainConfig) -> DataSetup:
    if config.download:
        download(config.dataset, config.data_dir, svhn_extra=config.svhn_extra)
    train = load_split(config.dataset, config.data_dir, "train", svhn_extra=config.svhn_extra)
    test = load_split(config.dataset, config.data_dir, "test")
    if train.class_names != test.class_names:
        raise DatasetError(
            f"the train and test splits of {config.data_dir} have different classes "
            f"({len(train.class_names)} vs {len(test.class_names)}); they must match"
        )
    in_channels = train.images.shape[1] if isinstance(train, TensorData) else 3
    return DataSetup(train, test, train.class_names, in_channels)


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
        **extra,
    }


def train(
    config: TrainConfig, run: RunDirectory, *, resume: bool = False, progress: bool = True
) -> dict[str, float]:
    """Train per ``config`` into ``run``; returns the last epoch's metrics."""
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic)
    try:
        return _train(config, run, resume, progress)
    finally:
        torch.use_deterministic_algorithms(previous_determinism)


def _train(config: TrainConfig, run: RunDirectory, resume: bool, progress: bool):
    # Under torchrun every process runs this function; the process group is already up (see
    # distributed.distributed_session) and only the main process writes or prints.
    context = current_context()
    context.data_shard.of(config.batch_size, train=True)  # refuse a batch that does not split
    progress = progress and context.is_main
    device = rank_device(resolve_device(config.device), context)
    # Every process has read the data (and the checkpoint) before the run directory changes, and
    # one that can't makes all of them stop.
    with stop_together(device):
        data = load_data(config)
        config = resolve_config(config, data)
        checkpoint = run.read_checkpoint() if resume else None
    if not resume:
        run.write_config(config)
    num_classes = len(data.class_names)

    torch.manual_seed(config.seed)
    model = build_model(config, data.in_channels, num_classes)
    if config.sync_bn:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    if config.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, config.lr, config.backbone_lr_scale)
    for group in groups:
        group["lr_scale"] = group["lr"] / config.lr
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 don't need it.
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    normalize = Normalize(config.mean, config.std).to(device)
    preprocessing = preprocessing_of(config)
    batches = dict(
        batch_size=config.batch_size,
        device=device,
        preprocessing=preprocessing,
        in_channels=data.in_channels,
        workers=config.workers,
        seed=config.seed,
        shard=context.data_shard,
    )
    train_batches = make_batches(
        data.train, train=True, augment=config.augment, padding=config.crop_padding, **batches
    )
    test_batches = make_batches(data.test, train=False, **batches)
    steps = len(train_batches)
    if steps == 0:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than the {len(data.train)} training images"
        )

    def say(line: str) -> None:
        if context.is_main:
            print(line)

    epoch, start_step, history, best_top1 = 0, 0, [], -1.0
    sums = _new_sums()
    if checkpoint is not None:
        if checkpoint["model_config"] != model.config.to_dict():
            raise CheckpointError(
                f"{run / run.CHECKPOINT} holds a different model than {run / run.CONFIG} describes"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        epoch, start_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        history, best_top1 = list(checkpoint["history"]), float(checkpoint["best_top1"])
        sums = dict(checkpoint["sums"])
        if epoch < config.epochs:
            say(f"resuming {run.path} at epoch {epoch + 1}, step {start_step}/{steps}")
        else:
            say(f"{run.path} has finished its {config.epochs} epochs; writing its final files")

    def state(epoch: int, step: int) -> dict[str, object]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "sums": dict(sums),
            "history": history,
            "best_top1": best_top1,
            "config": config.to_dict(),
            "model_config": model.config.to_dict(),
        }

    def save(epoch: int, step: int) -> None:
        # A diverging step can leave inf weights behind a finite loss: never checkpoint those.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(run, "weights became non-finite", epoch * steps + step, steps)
        run.write_checkpoint(state(epoch, step))

    meta = weights_meta(config, data)
    processes = f" x {context.world_size} processes" if context.enabled else ""
    say(
        f"training {meta['model'] or config.model + ' (modified)'} on {config.dataset}: "
        f"{len(data.train)} train / {len(data.test)} test images, {steps} steps of "
        f"{config.batch_size} per epoch, {config.precision} {config.memory_format} on "
        f"{device}{processes}"
    )
    # The optimizer updates `model`'s parameters; `trained` averages their gradients over ranks.
    trained = data_parallel(model, context, device)
    model.train()
    while epoch < config.epochs:
        lr = config.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        bar = tqdm(
            total=steps,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        tick = time.perf_counter()
        for step, batch in enumerate(train_batches.epoch(epoch, start_step), start=start_step):
            fetched = time.perf_counter()
            sums["data_seconds"] += fetched - tick
            # Every process takes the step or none does: the gradient average needs them all.
            if all_ranks_agree(len(batch.labels) > 0, device):
                # Dropout draws from the global RNG: a seed per step (and process) makes a resume
                # repeat it.
                torch.manual_seed(mix_seed(config.seed, epoch, step, 2, context.rank))
                images = to_memory_format(normalize(batch.images), config.memory_format)
                with autocast(device, config.precision):
                    logits = trained(images).float()
                loss = F.cross_entropy(logits, batch.labels)
                n = len(batch.labels)
                # This step's sums over all processes; a non-finite loss anywhere makes the loss
                # sum non-finite everywhere, so all processes stop together instead of hanging.
                step_sums = all_reduce_sum(
                    torch.stack(
                        [
                            loss.detach().double() * n,
                            (logits.argmax(1) == batch.labels).sum().double(),
                            topk_correct(logits, batch.labels, 5).sum().double(),
                            torch.tensor(n, dtype=torch.float64, device=device),
                            torch.tensor(batch.skipped, dtype=torch.float64, device=device),
                        ]
                    )
                ).tolist()  # syncs; also what the progress bar shows
                loss_sum, top1, top5, count, skipped = step_sums
                if not math.isfinite(loss_sum):
                    if not context.is_main:  # one message, from the main process
                        raise TrainingError(stopped_with_others(context.rank))
                    where = " on at least one process" if context.enabled else ""
                    loss_value = loss_sum / count
                    raise _diverged(
                        run, f"loss is {loss_value}{where}", epoch * steps + step + 1, steps
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                sums["loss"] += loss_sum
                sums["top1"] += top1
                sums["top5"] += top5
                sums["count"] += count
                sums["skipped"] += skipped
            else:
                sums["skipped"] += float(all_reduce_sum(torch.tensor(batch.skipped, device=device)))
            done = step + 1
            every = config.checkpoint_every
            if every and done < steps and (epoch * steps + done) % every == 0:
                save(epoch, done)
            # Everything but waiting for the batch counts as compute (checkpoints included).
            tick = time.perf_counter()
            sums["compute_seconds"] += tick - fetched
            seen = max(sums["count"], 1)
            elapsed = sums["compute_seconds"] + sums["data_seconds"]
            bar.update(1)
            bar.set_postfix(
                loss=f"{sums['loss'] / seen:.3f}",
                acc=f"{100 * sums['top1'] / seen:.1f}%",
                img_s=f"{sums['count'] / max(elapsed, 1e-9):.0f}",
                refresh=False,
            )
        bar.close()

        broadcast_buffers(model)  # evaluate the weights process 0 saves, on every process
        result = evaluate(
            model,
            test_batches,
            normalize,
            precision=config.precision,
            memory_format=config.memory_format,
            num_classes=num_classes,
        )
        seen = max(sums["count"], 1)
        train_seconds = sums["compute_seconds"] + sums["data_seconds"]
        row = {
            "epoch": epoch + 1,
            "train_loss": round(sums["loss"] / seen, 6),
            "train_top1": round(100 * sums["top1"] / seen, 4),
            "train_top5": round(100 * sums["top5"] / seen, 4),
            "test_loss": round(result.loss, 6),
            "test_top1": round(result.top1, 4),
            "test_top5": round(result.top5, 4),
            "lr": lr,
            "img_per_s": round(sums["count"] / max(train_seconds, 1e-9), 1),
            "seconds": round(train_seconds, 3),
            "data_share": round(sums["data_seconds"] / max(train_seconds, 1e-9), 4),
            "skipped_images": int(sums["skipped"] + result.skipped),
        }
        history.append(row)
        if result.top1 > best_top1:
            best_top1 = result.top1
            run.write_weights(
                model, run.BEST, {**meta, "epoch": epoch + 1, "test_top1": result.top1}
            )
        epoch, start_step, sums = epoch + 1, 0, _new_sums()
        # Checkpoint before metrics: a crash in between re-writes the metrics on resume.
        save(epoch, 0)
        run.write_metrics(history)
        say(_epoch_line(row, config.epochs))

    last = history[-1]
    run.write_weights(
        model, run.FINAL, {**meta, "epoch": last["epoch"], "test_top1": last["test_top1"]}
    )
    run.write_metrics(history)
    say(
        f"done: test top-1 {last['test_top1']:.2f}% (best {best_top1:.2f}%), weights in "
        f"{run / run.FINAL}"
    )
    return last


def _new_sums() -> dict[str, float]:
    keys = ("loss", "top1", "top5", "count", "compute_seconds", "data_seconds", "skipped")
    return dict.fromkeys(keys, 0.0)


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    skipped = (
        f", {row['skipped_images']} unreadable images skipped" if row["skipped_images"] else ""
    )
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} "
        f"top-1 {row['train_top1']:.2f}% | test loss {row['test_loss']:.4f} "
        f"top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% | lr {row['lr']:g} | "
        f"{row['img_per_s']:.0f} img/s, {row['seconds']:.1f}s "
        f"(waiting for data {100 * row['data_share']:.0f}%, compute "
        f"{100 * (1 - row['data_share']):.0f}%){skipped}"
    )


def _diverged(run: RunDirectory, what: str, global_step: int, steps: int) -> TrainingError:
    """The error for a run that produced non-finite numbers at (1-based) ``global_step``."""
    epoch, step = (global_step - 1) // steps + 1, (global_step - 1) % steps + 1
    path = run / run.CHECKPOINT
    kept = f"the last good checkpoint {path} is kept" if path.exists() else "no checkpoint was made"
    return TrainingError(
        f"{what} at epoch {epoch} step {step} (global step {global_step}); training stopped and "
        f"{kept}: lower --lr or use --precision fp32, then --resume or start again"
    )
