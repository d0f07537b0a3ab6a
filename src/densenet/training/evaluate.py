"""Accuracy of a model on a labelled set: loss, top-1, top-5, per-class accuracy, confusion; for
multi-label data, AUROC, average precision and F1 per class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.data.loaders import FolderBatches, Normalize, TensorBatches
from densenet.hardware import autocast, to_memory_format
from densenet.training.distributed import all_gather_rows, all_reduce_sum


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


class _Predictions:
    """Every test batch through ``model`` in eval mode: the float logits and labels of each batch
    with images; unreadable images are counted in ``skipped``."""

    def __init__(
        self,
        model: nn.Module,
        batches: TensorBatches | FolderBatches,
        normalize: Normalize,
        precision: str,
        memory_format: str,
    ) -> None:
        self.model, self.batches, self.normalize = model, batches, normalize
        self.precision, self.memory_format = precision, memory_format
        self.device = normalize.mean.device
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.batches.epoch(0):
                self.skipped += batch.skipped
                if len(batch.labels) == 0:
                    continue
                images = to_memory_format(self.normalize(batch.images), self.memory_format)
                with autocast(self.device, self.precision):
                    logits = self.model(images).float()
                yield logits, batch.labels
        finally:
            self.model.train(was_training)

    def skipped_everywhere(self) -> int:
        """Unreadable images over all processes."""
        return int(all_reduce_sum(torch.tensor(self.skipped, device=self.device)))


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
    predictions = _Predictions(model, batches, normalize, precision, memory_format)
    device = predictions.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    for logits, labels in predictions:
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top5 += topk_correct(logits, labels, 5).sum()
        # Accumulate on the device: one bincount per batch, one transfer at the end.
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(1), minlength=num_classes**2
        )
    # With several processes each one saw a shard of the data (see loaders.Shard): add them up.
    for total in (loss_sum, top5, confusion):
        all_reduce_sum(total)
    skipped = predictions.skipped_everywhere()
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = max(int(confusion.sum()), 1)
    return EvalResult(
        loss=float(loss_sum) / count,
        top1=100 * float(confusion.diag().sum()) / count,
        top5=100 * float(top5) / count,
        confusion=confusion,
        skipped=skipped,
    )


@dataclass
class MultiLabelResult:
    """A multi-label evaluation: every image's sigmoid scores and 0/1 labels (N, classes), over
    all processes, and the metrics computed from them with scikit-learn.

    A class whose images are all positive or all negative in the split has no ROC curve: its
    AUROC and average precision are NaN, and the means are over the other classes.
    """

    loss: float  # binary cross-entropy per image and class
    scores: np.ndarray
    labels: np.ndarray
    skipped: int = 0

    @property
    def count(self) -> int:
        return len(self.labels)

    def _ranked(self) -> list[int]:
        """The classes with both positive and negative images."""
        positives = self.labels.sum(0)
        return [c for c in range(self.labels.shape[1]) if 0 < positives[c] < self.count]

    def _per_class(self, metric: Callable[[np.ndarray, np.ndarray], float]) -> np.ndarray:
        """``metric(labels, scores)`` of each class that has both kinds of image; NaN elsewhere."""
        values = np.full(self.labels.shape[1], np.nan)
        for c in self._ranked():
            values[c] = metric(self.labels[:, c], self.scores[:, c])
        return values

    @cached_property
    def per_class_auroc(self) -> np.ndarray:
        from sklearn.metrics import roc_auc_score

        return self._per_class(roc_auc_score)

    @cached_property
    def per_class_ap(self) -> np.ndarray:
        from sklearn.metrics import average_precision_score

        return self._per_class(average_precision_score)

    @cached_property
    def per_class_f1(self) -> np.ndarray:
        """F1 of each class with the decision threshold at 0.5 (0 where nothing is positive)."""
        from sklearn.metrics import f1_score

        predicted = (self.scores >= 0.5).astype(int)
        return f1_score(self.labels, predicted, average=None, zero_division=0.0)

    @property
    def mean_auroc(self) -> float:
        return _mean(self.per_class_auroc)

    @property
    def mean_ap(self) -> float:
        return _mean(self.per_class_ap)

    @property
    def mean_f1(self) -> float:
        return float(self.per_class_f1.mean())

    def roc_curves(self, class_names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
        """(name, false positive rates, true positive rates, AUROC) of each class that has one."""
        from sklearn.metrics import roc_curve

        curves = []
        for c in self._ranked():
            fpr, tpr, _ = roc_curve(self.labels[:, c], self.scores[:, c])
            curves.append((class_names[c], fpr, tpr, float(self.per_class_auroc[c])))
        return curves


def _mean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


@torch.no_grad()
def evaluate_multilabel(
    model: nn.Module,
    batches: TensorBatches | FolderBatches,
    normalize: Normalize,
    *,
    precision: str,
    memory_format: str,
    num_classes: int,
) -> MultiLabelResult:
    """Scores every image; under torchrun AUROC ranks all images together, so each process's
    scores are gathered rather than its AUROC averaged (a mean of AUROCs is not the AUROC)."""
    predictions = _Predictions(model, batches, normalize, precision, memory_format)
    device = predictions.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    scores, labels = [], []
    for logits, targets in predictions:
        loss_sum += F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        scores.append(logits.sigmoid())
        labels.append(targets)
    empty = torch.zeros((0, num_classes), device=device)
    all_scores = all_gather_rows(torch.cat(scores) if scores else empty)
    all_labels = all_gather_rows(torch.cat(labels) if labels else empty)
    all_reduce_sum(loss_sum)
    skipped = predictions.skipped_everywhere()
    values = max(all_labels.numel(), 1)
    return MultiLabelResult(
        loss=float(loss_sum) / values,
        scores=all_scores.double().cpu().numpy(),
        labels=all_labels.cpu().numpy().astype(int),
        skipped=skipped,
    )
