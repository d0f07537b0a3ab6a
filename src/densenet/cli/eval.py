"""``densenet eval``: a weights file's accuracy on a dataset, per class, with a confusion matrix;
for a multi-label model, AUROC, average precision and F1 per class, with their ROC curves.

Started by ``torchrun``, the processes share the work: each evaluates its slice of every batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import typing
from pathlib import Path

import torch

from densenet.cli.arguments import non_negative_int, positive_int
from densenet.data.datasets import Data, TensorData, load_split
from densenet.data.loaders import Normalize, make_batches
from densenet.errors import ConfigError, DatasetError
from densenet.files import atomic_write, staged
from densenet.hardware import PrecisionChoice, resolve_device, resolve_precision_and_format
from densenet.models.densenet import DenseNet
from densenet.models.presets import Preprocessing
from densenet.training.config import DATASETS
from densenet.training.distributed import distributed_session, rank_device, stop_together
from densenet.training.evaluate import (
    EvalResult,
    MultiLabelResult,
    evaluate,
    evaluate_multilabel,
)
from densenet.training.plots import plot_confusion, plot_roc
from densenet.training.rundir import RunDirectory
from densenet.weights.registry import load_for_inference


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a weights file"
    )
    parser.add_argument("--weights", required=True, type=Path, help="a .safetensors or .pth file")
    parser.add_argument(
        "--model", help="preset, for weights that don't carry their config (torchvision .pth)"
    )
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument(
        "--csv", default="", help="--dataset csv: the CSV listing the split's images and labels"
    )
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="split over the processes under torchrun",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=typing.get_args(PrecisionChoice))
    parser.add_argument("--workers", type=non_negative_int, default=4)
    parser.add_argument(
        "--out", type=Path, help="where the PNG, CSV and JSON go (default: beside the weights)"
    )
    parser.set_defaults(run=run)


def _load_data(
    args: argparse.Namespace,
    model: DenseNet,
    preprocessing: Preprocessing,
    class_names: list[str] | None,
    multilabel: bool,
) -> Data:
    data = load_split(
        args.dataset,
        args.data_dir,
        args.split,
        csv_file=args.csv,
        task="multilabel" if multilabel else "single",
        class_names=class_names,
    )
    num_classes = model.config.num_classes
    if len(data.class_names) != num_classes:
        raise DatasetError(
            f"{args.dataset} has {len(data.class_names)} classes but the model predicts "
            f"{num_classes}"
        )
    if class_names is not None and list(class_names) != data.class_names:
        raise DatasetError(
            f"the weights were trained on classes {class_names[:5]}... but {args.dataset} has "
            f"{data.class_names[:5]}...; evaluate on the dataset they were trained on"
        )
    if isinstance(data, TensorData):
        size = data.images.shape[-1]
        if preprocessing.input_size != size or preprocessing.resize_size != size:
            raise ConfigError(
                f"the weights expect {preprocessing.input_size}px inputs but {args.dataset} "
                f"images are {size}px"
            )
    return data


def run(args: argparse.Namespace) -> int:
    out = args.out or args.weights.parent
    # Under torchrun each process evaluates its slice of every batch (loaders.Shard), the
    # counts are summed over the processes (evaluate.evaluate) and only the main one reports.
    device = resolve_device(args.device)
    with distributed_session(device) as context:
        device = rank_device(device, context)
        with stop_together(device):
            loaded = load_for_inference(args.weights, args.model)
            model, preprocessing = loaded.model, loaded.preprocessing
            multilabel = loaded.multilabel
            data = _load_data(args, model, preprocessing, loaded.class_names, multilabel)
            precision, memory_format = resolve_precision_and_format(device, args.precision)
            if context.is_main:
                RunDirectory.check_writable(out)

        model.to(device)
        if memory_format == "channels_last":
            model.to(memory_format=torch.channels_last)
        batches = make_batches(
            data,
            args.batch_size,
            device,
            train=False,
            preprocessing=preprocessing,
            in_channels=model.config.in_channels,
            workers=args.workers,
            shard=context.data_shard,
        )
        normalize = Normalize(preprocessing.mean, preprocessing.std).to(device)
        result = (evaluate_multilabel if multilabel else evaluate)(
            model,
            batches,
            normalize,
            precision=precision,
            memory_format=memory_format,
            num_classes=model.config.num_classes,
        )
        if context.is_main:
            processes = f", {context.world_size} processes" if context.enabled else ""
            report = _report_multilabel if multilabel else _report
            report(args, data.class_names, result, f"{precision}{processes}", out)
    return 0


def _report(
    args: argparse.Namespace, class_names: list[str], result: EvalResult, how: str, out: Path
) -> None:
    name = f"{args.dataset}-{args.split}"
    print(
        f"{args.weights} on {name} ({result.count} images, {how}): "
        f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}"
    )
    if result.skipped:
        print(f"{result.skipped} unreadable images were skipped")
    per_class = list(
        zip(class_names, result.per_class.tolist(), result.confusion.sum(1).tolist(), strict=True)
    )
    rows = sorted(per_class, key=lambda row: (math.isnan(row[1]), row[1]))
    shown = rows if len(rows) <= 20 else rows[:10]
    print("per-class top-1" + ("" if len(rows) <= 20 else " (the 10 worst)") + ":")
    for class_name, accuracy, count in shown:
        print(f"  {class_name:<24}{accuracy:7.2f}%  of {count}")
    metrics = {
        "top1": result.top1,
        "top5": result.top5,
        "class_names": class_names,
        "confusion": result.confusion.tolist(),  # rows: true classes, columns: predictions
    }
    header = ["class", "top1", "images"]
    csv_path, json_path = _write_tables(args, result, out, header, per_class, metrics)
    png_path = out / f"confusion-{name}.png"
    plot_confusion(
        result.confusion.numpy(),
        class_names,
        png_path,
        f"{args.weights.name} on {name}: top-1 {result.top1:.2f}%",
    )
    print(f"wrote {png_path}, {csv_path} and {json_path}")


def _report_multilabel(
    args: argparse.Namespace, class_names: list[str], result: MultiLabelResult, how: str, out: Path
) -> None:
    name = f"{args.dataset}-{args.split}"
    print(
        f"{args.weights} on {name} ({result.count} images, {how}): mean AUROC "
        f"{result.mean_auroc:.4f}  mAP {result.mean_ap:.4f}  mean F1 {result.mean_f1:.4f}  "
        f"loss {result.loss:.4f}"
    )
    if result.skipped:
        print(f"{result.skipped} unreadable images were skipped")
    positives = result.labels.sum(0).tolist()
    rows = list(
        zip(
            class_names,
            result.per_class_auroc.tolist(),
            result.per_class_ap.tolist(),
            result.per_class_f1.tolist(),
            positives,
            strict=True,
        )
    )
    print(f"  {'finding':<24}{'AUROC':>8}{'AP':>8}{'F1@0.5':>8}  positives")
    for finding, auroc, ap, f1, count in rows:
        print(f"  {finding:<24}{auroc:8.4f}{ap:8.4f}{f1:8.4f}  {count} of {result.count}")
    # JSON has no NaN: a finding without both positives and negatives has no AUROC (null).
    metrics = {
        "mean_auroc": _number(result.mean_auroc),
        "mean_average_precision": _number(result.mean_ap),
        "mean_f1": result.mean_f1,
        "class_names": class_names,
        "auroc": [_number(v) for v in result.per_class_auroc.tolist()],
        "average_precision": [_number(v) for v in result.per_class_ap.tolist()],
        "f1": result.per_class_f1.tolist(),
    }
    header = ["class", "auroc", "average_precision", "f1_at_0.5", "positives"]
    csv_path, json_path = _write_tables(args, result, out, header, rows, metrics)
    png_path = out / f"roc-{name}.png"
    plot_roc(
        result.roc_curves(class_names),
        png_path,
        f"{args.weights.name} on {name}: mean AUROC {result.mean_auroc:.4f}",
    )
    print(f"wrote {png_path}, {csv_path} and {json_path}")


def _write_tables(
    args: argparse.Namespace,
    result: EvalResult | MultiLabelResult,
    out: Path,
    header: list[str],
    rows: list[tuple],
    metrics: dict[str, object],
) -> tuple[Path, Path]:
    """per_class-NAME.csv (``header`` and ``rows``) and metrics-NAME.json (what was evaluated,
    then ``metrics``)."""
    name = f"{args.dataset}-{args.split}"
    csv_path = out / f"per_class-{name}.csv"
    with staged(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    json_path = out / f"metrics-{name}.json"
    evaluated = {
        "weights": str(args.weights),
        "dataset": args.dataset,
        "split": args.split,
        "images": result.count,
        "skipped": result.skipped,
        "loss": result.loss,
    }
    text = json.dumps({**evaluated, **metrics}, indent=1) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    return csv_path, json_path


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value
