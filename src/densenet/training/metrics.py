"""What a run measures: an epoch's running sums, and the rows of metrics.csv."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Tally:
    """Sums over the steps of an epoch so far, over every process."""

    loss_sum: float = 0.0  # loss times images, so that the mean is exact over uneven batches
    top1: float = 0.0
    top5: float = 0.0
    images: float = 0.0
    skipped: float = 0.0  # unreadable images left out

    @classmethod
    def read(cls, totals: Tensor) -> Tally:
        """The sums a device tensor holds in field order; waits for the device."""
        return cls(*totals.tolist())

    def totals(self, device: torch.device) -> Tensor:
        return torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)


class DeviceTally:
    """An epoch's running sums kept on the device, so that a step never waits for the host, and
    the first step whose loss was not finite."""

    def __init__(self, start: Tally, device: torch.device) -> None:
        self.totals = start.totals(device)
        self.first_bad_step = torch.tensor(-1, device=device)

    def add(self, step_sums: Tensor, step: int) -> None:
        """Add one step's sums (a tensor in :class:`Tally`'s field order)."""
        self.totals += step_sums
        bad = ~torch.isfinite(step_sums[0]) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def read(self) -> tuple[Tally, int | None]:
        """The sums so far and the first non-finite step, if any; waits for the device."""
        bad_step = int(self.first_bad_step)
        return Tally.read(self.totals), bad_step if bad_step >= 0 else None


@dataclass(frozen=True)
class EpochRow:
    """One line of metrics.csv: the field names are its header."""

    epoch: int
    train_loss: float
    train_top1: float
    train_top5: float
    test_loss: float
    test_top1: float
    test_top5: float
    ema_test_top1: float | None  # of the weight average (--ema-decay), None without one
    lr: float
    img_per_s: float
    seconds: float
    data_share: float
    skipped_images: int

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @property
    def score(self) -> float:
        """What picks the best epoch's weights: the better top-1 of the network and its average."""
        return max(self.test_top1, self.ema_test_top1 or -1.0)

    @property
    def raw_score(self) -> float:
        return self.test_top1

    @property
    def ema_score(self) -> float | None:
        return self.ema_test_top1

    def csv_row(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def line(self, epochs: int) -> str:
        """The line printed at the end of the epoch."""
        skipped = (
            f", {self.skipped_images} unreadable images skipped" if self.skipped_images else ""
        )
        ema = "" if self.ema_test_top1 is None else f" (EMA top-1 {self.ema_test_top1:.2f}%)"
        return (
            f"epoch {self.epoch}/{epochs}: train loss {self.train_loss:.4f} "
            f"top-1 {self.train_top1:.2f}% | test loss {self.test_loss:.4f} "
            f"top-1 {self.test_top1:.2f}% top-5 {self.test_top5:.2f}%{ema} | lr {self.lr:g} | "
            f"{self.img_per_s:.0f} img/s, {self.seconds:.1f}s "
            f"(waiting for data {100 * self.data_share:.0f}%, compute "
            f"{100 * (1 - self.data_share):.0f}%){skipped}"
        )


@dataclass(frozen=True)
class MultiLabelRow:
    """One line of a multi-label run's metrics.csv: top-1 means nothing when an image has several
    findings, so the test columns are ranking metrics, then one AUROC column per finding."""

    epoch: int
    train_loss: float
    test_loss: float
    test_mean_auroc: float
    test_mean_ap: float
    test_mean_f1: float
    lr: float
    img_per_s: float
    seconds: float
    data_share: float
    skipped_images: int
    test_auroc: dict[str, float]  # per finding; NaN where the test split has one label value only
    ema_test_mean_auroc: float | None = None  # of the weight average (--ema-decay)

    @property
    def score(self) -> float:
        """What picks the best epoch's weights: the better mean AUROC of the network and its
        average."""
        return max(self.test_mean_auroc, self.ema_score or -1.0)

    @property
    def raw_score(self) -> float:
        return self.test_mean_auroc

    @property
    def ema_score(self) -> float | None:
        return self.ema_test_mean_auroc

    def csv_row(self) -> dict[str, object]:
        row = dataclasses.asdict(self)
        per_class = row.pop("test_auroc")
        return {**row, **{f"auroc_{name}": value for name, value in per_class.items()}}

    def line(self, epochs: int) -> str:
        skipped = (
            f", {self.skipped_images} unreadable images skipped" if self.skipped_images else ""
        )
        ema = (
            ""
            if self.ema_test_mean_auroc is None
            else f" (EMA mean AUROC {self.ema_test_mean_auroc:.4f})"
        )
        return (
            f"epoch {self.epoch}/{epochs}: train loss {self.train_loss:.4f} | test loss "
            f"{self.test_loss:.4f} mean AUROC {self.test_mean_auroc:.4f}{ema} mAP "
            f"{self.test_mean_ap:.4f} mean F1 {self.test_mean_f1:.4f} | lr {self.lr:g} | "
            f"{self.img_per_s:.0f} img/s, {self.seconds:.1f}s{skipped}"
        )


Row = EpochRow | MultiLabelRow


def row_from_dict(data: dict[str, object]) -> Row:
    """A history row saved with ``dataclasses.asdict``, as the class it was."""
    return MultiLabelRow(**data) if "test_mean_auroc" in data else EpochRow(**data)  # type: ignore[arg-type]
