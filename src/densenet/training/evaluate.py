"""Accuracy of a model on a labelled set: loss, top-1, top-5, per-class accuracy, confusion."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.data.loaders import FolderBatches, Normalize, TensorBatches
from densenet.hardware import autocast, to_memory_format
from densenet.training.distributed import all_reduce_sum


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent (top-k with k = the number of classes when there are fewer than 5)
    confusion: Tensor  # (classes, classes) counts; rows are true classes
    skipped: int = 0  # unreadable images left out

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def per_class(self) -> Tensor:
        """Top-1 accuracy (%) of each true class; NaN for a class with no images."""
        totals = self.confusion.sum(1).double()
        return 100 * self.confusion.diag().double() / totals


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per sample: is the label among the ``k`` highest logits?"""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: TensorBatches | FolderBatches,
    normalize: Normalize,
    *,
    precision: str,
    memory_format: str,
    num_classes: int,
) -> EvalResult:
    was_training = model.training
    model.eval()
    device = normalize.mean.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    skipped = 0
    for batch in batches.epoch(0):
        skipped += batch.skipped
        if len(batch.labels) == 0:
            continue
        with autocast(device, precision):
            logits = model(to_memory_format(normalize(batch.images), memory_format)).float()
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
        top5 += topk_correct(logits, batch.labels, 5).sum()
        # Accumulate on the device: one bincount per batch, one transfer at the end.
        confusion += torch.bincount(
            batch.labels * num_classes + logits.argmax(1), minlength=num_classes**2
        )
    model.train(was_training)
    # With several processes each one saw a shard of the data (see loaders.Shard): add them up.
    for total in (loss_sum, top5, confusion):
        all_reduce_sum(total)
    skipped = int(all_reduce_sum(torch.tensor(skipped, device=device)))
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = max(int(confusion.sum()), 1)
    return EvalResult(
        loss=float(loss_sum) / count,
        top1=100 * float(confusion.diag().sum()) / count,
        top5=100 * float(top5) / count,
        confusion=confusion,
        skipped=skipped,
    )
