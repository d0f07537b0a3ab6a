"""Tiny datasets in the exact on-disk formats torchvision downloads, made for tests (no network)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 8) -> Path:
    """CIFAR's python pickles: five train batches (one for CIFAR-100), a test batch, the meta."""
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    classes = 10 if ten else 100
    label_key = "labels" if ten else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if ten else ["train", "test"]
    for seed, file in enumerate(files):
        labels = [(seed + i) % classes for i in range(per_batch)]
        batch = {"data": _images(per_batch, seed).reshape(per_batch, -1), label_key: labels}
        with open(folder / file, "wb") as handle:
            pickle.dump(batch, handle)
    names = [f"class{i}" for i in range(classes)]
    meta = {"label_names": names} if ten else {"fine_label_names": names}
    with open(folder / ("batches.meta" if ten else "meta"), "wb") as handle:
        pickle.dump(meta, handle)
    return folder


def write_svhn(root: Path, n: int = 12) -> None:
    """SVHN's .mat files: X is (32, 32, 3, N), y is (N, 1) with the digit 0 labelled 10."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for seed, split in enumerate(("train", "extra", "test")):
        x = _images(n, seed).transpose(2, 3, 1, 0)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})


def write_image_folder(root: Path, per_class: int = 4, size: int = 40) -> None:
    """DIR/{train,val}/{cat,dog}/N.png with images of ``size`` px (any size works)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


SHAPES = ("square", "disc", "cross")


def _draw(pixels: np.ndarray, kind: str, top: int, left: int, side: int) -> None:
    rows, cols = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    if kind == "square":
        mask = np.ones((side, side), dtype=bool)
    elif kind == "disc":
        mask = (rows - centre) ** 2 + (cols - centre) ** 2 <= centre**2
    else:
        mask = (abs(rows - centre) < 1.5) | (abs(cols - centre) < 1.5)
    pixels[top : top + side, left : left + side][mask] = 255


def write_shapes_csv(root: Path, train: int = 480, test: int = 160, size: int = 32) -> None:
    """Multi-label images: 0-3 white shapes of different kinds on black, at random places;
    labels say which kinds are present. Writes ``root/images/*.png``, ``root/train.csv`` and
    ``root/test.csv`` (columns: path, then one 0/1 column per kind)."""
    rng = np.random.default_rng(0)
    side = size // 3
    (root / "images").mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        lines = ["path," + ",".join(SHAPES)]
        for i in range(count):
            present = rng.random(len(SHAPES)) < 0.5
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            # One shape per third of the image (in random order), so shapes never overlap.
            slots = rng.permutation(3)
            for slot, kind in zip(slots, np.array(SHAPES)[present], strict=False):
                top = int(rng.integers(0, size - side + 1))
                left = int(slot * side + rng.integers(0, size // 3 - side + 1))
                _draw(pixels, str(kind), top, left, side)
            name = f"images/{split}{i}.png"
            Image.fromarray(pixels).save(root / name)
            lines.append(name + "," + ",".join(str(int(p)) for p in present))
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
