"""Figures of a run: training curves and confusion matrices (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from densenet.files import atomic_write
from densenet.training.metrics import EpochRow, Row


def plot_curves(history: list[Row], path: Path) -> None:
    """Loss and top-1 accuracy per epoch, train and test; multi-label runs: test mean AUROC."""
    figure = curves_figure(history)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def curves_figure(history: list[Row]) -> Figure:
    """The figure of :func:`plot_curves`."""
    epochs = [row.epoch for row in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    single = isinstance(history[0], EpochRow)
    for split in ("train", "test"):
        losses = [getattr(row, f"{split}_loss") for row in history]
        loss_axes.plot(epochs, losses, marker=".", label=split)
        if single:
            accuracies = [getattr(row, f"{split}_top1") for row in history]
            acc_axes.plot(epochs, accuracies, marker=".", label=split)
    if not single:
        acc_axes.plot(epochs, [row.score for row in history], marker=".", label="test")
    loss_axes.set(
        xlabel="epoch", ylabel="cross-entropy loss" if single else "BCE loss", title="loss"
    )
    if single:
        acc_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    else:
        acc_axes.set(xlabel="epoch", ylabel="mean AUROC", title="ranking")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.legend()
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def render(figure: Figure) -> np.ndarray:
    """The figure's RGB pixels (height x width x 3, uint8) at its own dpi."""
    # A canvas of its own: pyplot (and the backend it picks) stays out of it.
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predictions; each row is normalised to sum to 1."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = confusion / np.maximum(rows, 1)
    size = min(4 + 0.35 * len(class_names), 20)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    if len(class_names) <= 30:
        ticks = range(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=90)
        axes.set_yticks(ticks, class_names)
        if len(class_names) <= 12:
            for i in ticks:
                for j in ticks:
                    if confusion[i, j]:
                        colour = "white" if normalised[i, j] > 0.5 else "black"
                        axes.text(
                            j, i, int(confusion[i, j]), ha="center", va="center", color=colour
                        )
    axes.set(xlabel="predicted", ylabel="true", title=title)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def plot_roc(
    curves: list[tuple[str, np.ndarray, np.ndarray, float]], path: Path, title: str
) -> None:
    """One ROC curve per class: (name, false positive rates, true positive rates, AUROC)."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    for name, fpr, tpr, auroc in curves:
        axes.plot(fpr, tpr, label=f"{name} ({auroc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
