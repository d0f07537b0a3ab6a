"""Batches for training and evaluation, where batch ``step`` of ``epoch`` depends only on
(seed, epoch, step): its images, their order and their augmentation. A run resumed at any step
therefore sees exactly the batches the uninterrupted run would have seen.

In-memory datasets are indexed, cropped and flipped on the device, a whole batch per tensor
operation. ImageFolder data goes through a DataLoader whose workers decode and augment each image
with a per-image seed drawn from the same function.

RandAugment and TrivialAugmentWide (``auto_augment``) are applied to in-memory data image by image
on the device, each image with torch's global generator seeded from (seed, epoch, step) and its
place in the global batch: torchvision's ops given a batch apply one op at one magnitude to all of
its images, which is a weaker augmentation than the policies' per-image draws, and a batched
version of their 14 ops would be a second implementation of torchvision's. The loop costs a few
small tensor operations per image and step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from densenet.data.datasets import Data, FolderData, TensorData
from densenet.data.images import auto_augment_op, eval_transform, read_image, train_transform
from densenet.errors import ConfigError, DatasetError
from densenet.models.presets import Preprocessing


@dataclass
class Batch:
    images: Tensor  # uint8 (N, C, H, W), on the device
    labels: Tensor  # int64 (N,), or float (N, classes) of 0/1 for multi-label data; on the device
    skipped: int = 0  # unreadable images left out of this batch


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a simple polynomial hash; collisions don't matter)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return seed


def epoch_order(n: int, seed: int, epoch: int, train: bool) -> Tensor:
    """The order of an epoch's ``n`` samples: shuffled per (seed, epoch) for training."""
    if not train:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


def batches_per_epoch(n: int, batch_size: int, train: bool) -> int:
    # Training drops the last partial batch so every step has the recipe's batch size.
    return n // batch_size if train else -(-n // batch_size)


def global_batch(order: Tensor, step: int, batch_size: int) -> Tensor:
    """The indices of batch ``step`` over all processes: the same for any number of them."""
    return order[step * batch_size : (step + 1) * batch_size]


@dataclass(frozen=True)
class Shard:
    """The part of every global batch that this process takes: part ``index`` of ``count``.

    Under torchrun these are the process's rank and the number of processes; a lone process takes
    whole batches.
    """

    index: int = 0
    count: int = 1

    def of(self, size: int, train: bool) -> slice:
        """This process's contiguous part of a global batch of ``size``.

        Training batches must split evenly (every process computes an equal share of the
        gradient); the last evaluation batch may not, and its parts may differ by one image.
        """
        base, extra = divmod(size, self.count)
        if train and extra:
            raise ConfigError(
                f"batch size {size} does not split evenly over {self.count} processes;"
                f" use a multiple of {self.count}"
            )
        start = self.index * base + min(self.index, extra)
        return slice(start, start + base + (self.index < extra))


def crop_and_flip(
    images: Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator,
    batch_size: int | None = None,
    shard: slice = slice(None),
) -> Tensor:
    """Zero-pad by ``padding``, take a random crop of the original size and maybe mirror it.

    One gather does the whole batch: each image's rows and columns are index ranges starting at
    its random offset, reversed for the images being flipped. With several processes ``images``
    is the ``shard`` of a global batch of ``batch_size``: the draws are made for the whole batch
    and sliced, so an image's augmentation does not depend on the number of processes.
    """
    n, _, height, width = images.shape
    drawn = batch_size or n
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[shard].to(device)
    dx = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[shard].to(device)
    cols = torch.arange(width, device=device).expand(n, width)
    if flip:
        mirrored = torch.rand(drawn, generator=generator)[shard].to(device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(height, device=device)
    cols = dx[:, None] + cols
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def augment_each(images: Tensor, policy: v2.Transform, seeds: list[int]) -> Tensor:
    """``policy`` applied to each of ``images`` with its own draws, from torch's global generator
    seeded by its entry of ``seeds``; the caller's generator state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        augmented = []
        for image, seed in zip(images, seeds, strict=True):
            # The CPU generator only: the policies draw on it even for images on a GPU.
            torch.default_generator.manual_seed(seed)
            augmented.append(policy(image))
    return torch.stack(augmented)


class TensorBatches:
    """Batches of a :class:`TensorData` held on the device."""

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        device: torch.device,
        *,
        train: bool,
        seed: int = 0,
        augment: str = "none",
        padding: int = 0,
        auto_augment: str = "none",
        shard: Shard = Shard(),
    ) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.augment, self.padding, self.shard = augment, padding, shard
        self.policy = auto_augment_op(auto_augment)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.labels), self.batch_size, self.train)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.labels), self.seed, epoch, self.train)
        for step in range(start_step, len(self)):
            batch = global_batch(order, step, self.batch_size)
            shard = self.shard.of(len(batch), self.train)
            index = batch[shard].to(self.images.device)
            images = self.images[index]
            if self.train and self.augment in ("crop", "crop_flip"):
                generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, 1))
                flip = self.augment == "crop_flip"
                images = crop_and_flip(images, self.padding, flip, generator, len(batch), shard)
            if self.train and self.policy is not None:
                # Seeded by the place in the global batch: the same for any number of processes.
                places = range(len(batch))[shard]
                seeds = [mix_seed(self.seed, epoch, step, 3, place) for place in places]
                images = augment_each(images, self.policy, seeds)
            yield Batch(images, self.labels[index])


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one image per (index, seed) pair; an unreadable file gives None, to be counted."""

    def __init__(self, data: FolderData, transform: v2.Compose, in_channels: int) -> None:
        self.samples, self.transform, self.in_channels = data.samples, transform, in_channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int | tuple[float, ...]] | None:
        index, seed = item
        path, label = self.samples[index]
        # torchvision's random transforms draw from the global RNG of the worker process.
        torch.manual_seed(seed)
        try:
            return self.transform(read_image(path, self.in_channels)), label
        except DatasetError:  # undecodable, or too many pixels before or after the resize
            return None


def _collate(
    items: list[tuple[Tensor, int | tuple[float, ...]] | None],
) -> tuple[Tensor, Tensor, int]:
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([label for _, label in good]), skipped


class FolderBatches:
    """Batches of an ImageFolder split, decoded by DataLoader workers.

    Unreadable images (truncated, not an image) are skipped and counted rather than stopping a
    run of many hours; the trainer reports the count every epoch.
    """

    def __init__(
        self,
        data: FolderData,
        batch_size: int,
        device: torch.device,
        *,
        train: bool,
        transform: v2.Compose,
        in_channels: int,
        workers: int,
        seed: int = 0,
        shard: Shard = Shard(),
    ) -> None:
        self.files = ImageFiles(data, transform, in_channels)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.workers, self.seed, self.shard = workers, seed, shard

    def __len__(self) -> int:
        return batches_per_epoch(len(self.files), self.batch_size, self.train)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.files), self.seed, epoch, self.train)

        # A generator: an ImageNet epoch's million (index, seed) pairs are made as they are needed.
        def requests(step: int) -> list[tuple[int, int]]:
            batch = global_batch(order, step, self.batch_size)
            shard = batch[self.shard.of(len(batch), self.train)]
            return [(int(i), mix_seed(self.seed, epoch, step, int(i))) for i in shard]

        batches = (requests(step) for step in range(start_step, len(self)))
        loader = DataLoader(
            self.files,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels, skipped in loader:
            yield Batch(
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                skipped,
            )


def make_batches(
    data: Data,
    batch_size: int,
    device: torch.device,
    *,
    train: bool,
    preprocessing: Preprocessing,
    in_channels: int,
    augment: str = "none",
    padding: int = 0,
    auto_augment: str = "none",
    workers: int = 0,
    seed: int = 0,
    shard: Shard = Shard(),
) -> TensorBatches | FolderBatches:
    if isinstance(data, TensorData):
        return TensorBatches(
            data,
            batch_size,
            device,
            train=train,
            seed=seed,
            augment=augment,
            padding=padding,
            auto_augment=auto_augment,
            shard=shard,
        )
    if train:
        transform = train_transform(preprocessing, augment, padding, auto_augment)
    else:
        transform = eval_transform(preprocessing)
    return FolderBatches(
        data,
        batch_size,
        device,
        train=train,
        transform=transform,
        in_channels=in_channels,
        workers=workers,
        seed=seed,
        shard=shard,
    )


class Normalize(torch.nn.Module):
    """uint8 images to the network input: scale to [0, 1], subtract mean, divide by std.

    The same operations, in the same order, as ToTensor followed by Normalize; ``densenet
    predict`` normalises with this module too, so it computes the input evaluation computes.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images.float().div(255).sub(self.mean).div(self.std)
