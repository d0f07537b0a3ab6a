"""``densenet predict IMAGE|FOLDER... --weights FILE``: top-k labels with probabilities (a
multi-label model: every finding's own probability)."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from tqdm import tqdm

from densenet.deploy.predict import Prediction, Predictor, image_files
from densenet.errors import ConfigError
from densenet.files import atomic_write
from densenet.weights.registry import load_for_inference


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="classify image files, or folders of them")
    parser.add_argument(
        "images",
        nargs="+",
        type=Path,
        help="JPEG/PNG files of any size, or folders searched recursively for image files",
    )
    parser.add_argument("--weights", required=True, help="weights file or URL")
    parser.add_argument(
        "--model",
        help="preset name, for weights that don't carry their config or preprocessing "
        "(e.g. torchvision checkpoints): the preset's preprocessing is used",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="also write the predictions to this CSV file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size must be at least 1")
    loaded = load_for_inference(args.weights, args.model)
    predictor = Predictor(
        loaded.model, loaded.preprocessing, loaded.class_names, multilabel=loaded.multilabel
    )
    paths = image_files(args.images)
    # Files named one by one must all be readable; in a folder, an unreadable one is skipped.
    folders = any(path.is_dir() for path in args.images)
    predictions, skipped = [], []
    batches = predictor.predict_batches(paths, args.top_k, args.batch_size, folders)
    bar = tqdm(total=len(paths), unit="image", disable=not sys.stderr.isatty(), leave=False)
    for batch, unreadable in batches:
        predictions += batch
        skipped += unreadable
        bar.update(len(batch) + len(unreadable))
    bar.close()
    # Printed once every file has been read: an unreadable file given by name stops the command
    # before any output.
    for prediction in predictions:
        labels = ", ".join(f"{label} {probability:.3f}" for label, probability in prediction.top)
        print(f"{prediction.path}: {labels}")
    for path in skipped:
        print(f"skipped {path}: unreadable", file=sys.stderr)
    if args.output is not None and predictor.multilabel:
        _write_multilabel_csv(args.output, predictions, predictor.class_names)
    elif args.output is not None:
        _write_csv(args.output, predictions, min(args.top_k, len(predictor.class_names)))
    return 0


def _write_csv(path: Path, predictions: list[Prediction], k: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    header = ["path"]
    for rank in range(1, k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    writer.writerow(header)
    for prediction in predictions:
        row = [str(prediction.path)]
        for label, probability in prediction.top:
            row += [label, f"{probability:.6f}"]
        writer.writerow(row)
    atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))


def _write_multilabel_csv(path: Path, predictions: list[Prediction], findings: list[str]) -> None:
    """One column per finding, holding its probability: the layout of a multi-label CSV."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *findings])
    for prediction in predictions:
        writer.writerow([str(prediction.path), *(f"{p:.6f}" for _, p in prediction.top)])
    atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))
