"""Reading datasets from disk: small ones into uint8 tensors in memory, ImageFolder as file lists.

Each reader checks for the files it needs first and fails with the exact path expected and how to
get the data; a file that exists but can't be parsed is reported as corrupt. ``--download`` uses
torchvision's downloaders (which verify checksums) and then the same readers.
"""

from __future__ import annotations

import csv
import os
import pickle
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from densenet.errors import DatasetError, brief, require

DIGITS_TEST_FRACTION = 0.2
# The held-out digits split never changes with the training seed: results stay comparable.
DIGITS_SPLIT_SEED = 0

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}
# SVHN's largest file, extra_32x32.mat, holds 531,131 images.
SVHN_MAX_IMAGES = 1_000_000
SVHN_FILES = {"train": "train_32x32.mat", "extra": "extra_32x32.mat", "test": "test_32x32.mat"}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_READER = "reading SVHN's MATLAB files"


@dataclass
class TensorData:
    """A labelled image set held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderData:
    """Image files and their labels, read lazily by DataLoader workers: an ImageFolder split or a
    CSV's. A sample's label is a class index, or with ``multilabel`` one 0.0/1.0 per class."""

    samples: list[tuple[str, int | tuple[float, ...]]]
    class_names: list[str]
    root: Path
    multilabel: bool = False

    def __len__(self) -> int:
        return len(self.samples)


Data = TensorData | FolderData


def load_split(
    name: str,
    data_dir: str | Path,
    split: str,
    *,
    svhn_extra: bool = True,
    csv_file: str | Path = "",
    task: str = "auto",
    class_names: list[str] | None = None,
) -> Data:
    """The ``train`` or ``test`` split of dataset ``name`` (ImageFolder's test split is ``val``).

    The ``csv`` dataset reads ``csv_file`` (see :func:`read_csv_split`): ``task`` and, for a
    single-label test split, the training split's ``class_names`` say how to read its labels.
    """
    data_dir = Path(data_dir)
    if name == "csv":
        return read_csv_split(data_dir, csv_file, split, task, class_names)
    if name == "digits":
        return _digits(split)
    if name in CIFAR:
        return _cifar(name, data_dir, split)
    if name == "svhn":
        parts = ["train", "extra"] if split == "train" and svhn_extra else [split]
        return _svhn(data_dir, parts)
    if name == "imagefolder":
        return _image_folder(data_dir, "train" if split == "train" else "val")
    raise DatasetError(f"unknown dataset {name!r}")


def download(name: str, data_dir: str | Path, *, svhn_extra: bool = True) -> None:
    """Fetch ``name`` into ``data_dir`` with torchvision's downloaders (checksums verified)."""
    import torchvision.datasets as tvd

    data_dir = Path(data_dir)
    try:
        if name == "cifar10":
            tvd.CIFAR10(str(data_dir), download=True)
        elif name == "cifar100":
            tvd.CIFAR100(str(data_dir), download=True)
        elif name == "svhn":
            require("scipy", purpose=SVHN_READER, extra="svhn")  # torchvision reads what it fetched
            for split in ["train", "test"] + (["extra"] if svhn_extra else []):
                tvd.SVHN(str(data_dir), split=split, download=True)
        elif name in ("imagefolder", "csv"):
            raise DatasetError(
                f"{name} data cannot be downloaded; put the images (and CSV files) in {data_dir}"
            )
    except (OSError, RuntimeError) as error:  # URLError is an OSError; bad checksums RuntimeError
        raise DatasetError(f"could not download {name} into {data_dir}: {error}") from None


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the 0-1 scale, a chunk at a time (SVHN's
    600k images would take 15 GB as one float64 tensor)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for part in images.split(chunk):
        pixels = part.transpose(0, 1).flatten(1).double() / 255
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
    count = images.numel() / channels
    mean = total / count
    std = (squares / count - mean.square()).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _digits(split: str) -> TensorData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 images with values 0..16: put them on the usual 0..255 scale of image files.
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        digits.target,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return TensorData(torch.from_numpy(x), torch.from_numpy(y).long(), [str(i) for i in range(10)])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy types they contain, so no code can run."""

    ALLOWED: typing.ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise DatasetError(
            f"{path} is corrupt ({type(error).__name__}: {error}); delete it and run again with "
            "--download"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} is corrupt (not a CIFAR batch); delete it and use --download")
    return data


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch file's images (N, 3, 32, 32) and labels (N,), checked."""
    batch = _read_pickle(path)
    data, labels = _array(batch.get("data")), _array(batch.get(label_key))
    pixels = 3 * 32 * 32
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DatasetError(
            f"{path} is corrupt: 'data' must be a uint8 array of {pixels} pixels a row, got "
            f"{_describe(batch.get('data'))}; delete it and run again with --download"
        )
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{path} is corrupt: {label_key!r} must be a list of integer labels, got "
            f"{_describe(batch.get(label_key))}; delete it and run again with --download"
        )
    if len(data) != len(labels):
        raise DatasetError(f"{path} is corrupt: {len(data)} images, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _array(value: object) -> np.ndarray | None:
    """``value`` as an array if it is a list or an array with a regular shape, else None."""
    if not isinstance(value, (list, np.ndarray)):
        return None
    try:
        return np.asarray(value)
    except ValueError:  # a ragged list
        return None


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return brief(value)


def _cifar(name: str, data_dir: Path, split: str) -> TensorData:
    spec = CIFAR[name]
    folder = data_dir / spec["folder"]
    meta_file, names_key = spec["meta"]
    needed = [*spec[split], meta_file]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{name} not found: expected {folder / missing[0]}; run with --download, or download "
            f"{spec['url']} and extract it into {data_dir}"
        )
    images, labels = [], []
    for file in spec[split]:
        data, batch_labels = _cifar_batch(folder / file, spec["labels"])
        images.append(data)
        labels.append(batch_labels)
    class_names = _read_pickle(folder / meta_file).get(names_key)
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise DatasetError(
            f"{folder / meta_file} is corrupt: {names_key!r} must be a list of class names, got "
            f"{brief(class_names)}; delete it and run again with --download"
        )
    return _checked(
        TensorData(
            torch.from_numpy(np.concatenate(images)),
            torch.from_numpy(np.concatenate(labels)),
            class_names,
        ),
        folder,
    )


def _svhn(data_dir: Path, parts: list[str]) -> TensorData:
    require("scipy", purpose=SVHN_READER, extra="svhn")
    from scipy.io import loadmat, whosmat

    images, labels = [], []
    for part in parts:
        path = data_dir / SVHN_FILES[part]
        if not path.is_file():
            raise DatasetError(
                f"svhn not found: expected {path}; run with --download, or download "
                f"{SVHN_URL}{SVHN_FILES[part]} into {data_dir}"
            )
        try:
            _check_svhn_shapes(path, whosmat(str(path)))
            mat = loadmat(str(path))
            # Stored as (H, W, C, N) with the digit 0 labelled 10.
            x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10
        except DatasetError:
            raise
        except Exception as error:  # scipy raises ValueError, MatReadError, KeyError, ...
            raise DatasetError(
                f"{path} is corrupt ({type(error).__name__}: {error}); delete it and run again "
                "with --download"
            ) from None
        if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
            raise DatasetError(f"{path} is corrupt: images {x.shape[1:]} for {len(y)} labels")
        images.append(x)
        labels.append(y)
    data = TensorData(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        [str(i) for i in range(10)],
    )
    return _checked(data, data_dir)


def _check_svhn_shapes(path: Path, variables: list[tuple[str, tuple[int, ...], str]]) -> None:
    """Refuse a .mat whose header declares other arrays than SVHN's, before they are allocated:
    a few bytes of header can declare gigabytes."""
    shapes = {name: tuple(shape) for name, shape, _ in variables}
    images, labels = shapes.get("X"), shapes.get("y")
    if (
        images is None
        or labels is None
        or len(images) != 4
        or images[:3] != (32, 32, 3)
        or not 0 < images[3] <= SVHN_MAX_IMAGES
        or labels not in ((images[3], 1), (1, images[3]))
    ):
        raise DatasetError(
            f"{path} is not an SVHN file: it declares X {images} and y {labels}, where SVHN has "
            f"X (32, 32, 3, N) and y (N, 1) with N at most {SVHN_MAX_IMAGES:,}; delete it and run "
            "again with --download"
        )


def _checked(data: TensorData, where: Path) -> TensorData:
    if len(data) == 0:
        raise DatasetError(f"{where} holds no images")
    num_classes = len(data.class_names)
    if int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes:
        raise DatasetError(f"{where} is corrupt: labels outside 0..{num_classes - 1}")
    return data


def _image_folder(data_dir: Path, split: str) -> FolderData:
    """The images of ``data_dir/split/CLASS/...``, listed in torchvision ImageFolder's order.

    Inside a class folder, links to directories are not followed: one to ``..`` would add every
    other class's images under this class's label, one to ``.`` would list forever. Links to
    files are followed, and a class folder may itself be a link (to data stored elsewhere), unless
    it leads back to a folder that holds the split.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = data_dir / split
    if not root.is_dir():
        raise DatasetError(
            f"ImageFolder split not found: expected {root}/CLASS_NAME/IMAGE.jpg (one folder per "
            f"class, under {data_dir}/train and {data_dir}/val)"
        )
    try:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        # Only lists the files: images are opened (and bad ones counted) when batches are made.
        samples = []
        for label, name in enumerate(classes):
            folder = root / name
            if root.resolve().is_relative_to(folder.resolve()):
                raise DatasetError(
                    f"{folder} leads to {folder.resolve()}, which holds {root} itself: its "
                    "images would be listed again under this class; make it a folder of images"
                )
            files = [
                os.path.join(directory, file)
                for directory, _, names in sorted(os.walk(folder))
                for file in sorted(names)
                if file.lower().endswith(IMG_EXTENSIONS)
            ]
            if not files:
                raise DatasetError(
                    f"{folder} holds no images (files ending in {', '.join(IMG_EXTENSIONS)}); "
                    "put the class's images there or remove the folder"
                )
            samples += [(file, label) for file in files]
    except OSError as error:
        raise DatasetError(f"cannot list {root}: {error}") from None
    if not classes:
        raise DatasetError(
            f"{root} holds no class folders: expected {root}/CLASS_NAME/IMAGE.jpg, one folder per "
            "class"
        )
    return FolderData(samples, classes, root)


def read_csv_split(
    data_dir: Path,
    csv_file: str | Path,
    split: str,
    task: str = "auto",
    class_names: list[str] | None = None,
) -> FolderData:
    """The images a CSV lists, with their labels; every row is checked before any image is read.

    The image path column is ``path`` or else the first column, relative to ``data_dir``. One
    other column is a single-label class (its values, sorted, are the class names, unless
    ``class_names`` fixes them); several are multi-label 0/1 columns named by their findings.
    ``task`` ("single" or "multilabel") settles what one 0/1 column means; "auto" reads it as
    single-label.
    """
    if not csv_file:
        raise DatasetError(
            f"the csv dataset needs the CSV of its {split} split (image paths and labels): "
            f"--{split}-csv FILE for train, --csv FILE for eval"
        )
    path = Path(csv_file)
    if not path.is_absolute() and not path.exists():
        path = data_dir / path
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read the {split} split's CSV {path}: {error}") from None
    if not rows:
        raise DatasetError(f"{path} is empty: the first line must name the columns")
    header = [name.strip() for name in rows[0]]
    path_column = header.index("path") if "path" in header else 0
    label_columns = [i for i in range(len(header)) if i != path_column]
    if not label_columns:
        raise DatasetError(
            f"{path} has only the column {header[path_column]!r}: add a label column "
            "(single-label) or one 0/1 column per finding (multi-label)"
        )
    if task == "single" and len(label_columns) > 1:
        names = ", ".join(header[i] for i in label_columns)
        raise DatasetError(
            f"{path} has {len(label_columns)} label columns ({names}) but --task single takes "
            "one; use --task multilabel (or auto), or keep one label column"
        )
    multilabel = task == "multilabel" or len(label_columns) > 1
    rows = rows[1:]
    if not rows:
        raise DatasetError(f"{path} lists no images, only the header")
    values = []
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DatasetError(
                f"{path} line {line} has {len(row)} fields, the header {len(header)}: give every "
                "row a value in every column"
            )
        image = data_dir / row[path_column].strip()
        if not row[path_column].strip() or not image.is_file():
            raise DatasetError(
                f"{path} line {line}: image {image} does not exist; fix its path (relative to "
                f"{data_dir}) or remove the row"
            )
        labels = [row[i].strip() for i in label_columns]
        if multilabel:
            for column, value in zip(label_columns, labels, strict=True):
                if value not in ("0", "1"):
                    raise DatasetError(
                        f"{path} line {line}: column {header[column]!r} is {value!r}, but "
                        "multi-label columns hold 0 or 1; fix the value"
                    )
        values.append((str(image), labels))
    if multilabel:
        names = [header[i] for i in label_columns]
        samples = [(image, tuple(float(v) for v in labels)) for image, labels in values]
        return FolderData(samples, names, data_dir, multilabel=True)  # type: ignore[arg-type]
    names = class_names or sorted({labels[0] for _, labels in values})
    index = {name: i for i, name in enumerate(names)}
    for line, (_, labels) in enumerate(values, start=2):
        if labels[0] not in index:
            raise DatasetError(
                f"{path} line {line}: class {labels[0]!r} is not one of the training classes "
                f"({', '.join(names[:10])}); fix the label or remove the row"
            )
    return FolderData([(image, index[labels[0]]) for image, labels in values], names, data_dir)
