"""``densenet explain IMAGE... --weights FILE --out DIR``: Grad-CAM heatmaps over the images."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image

from densenet.data.loaders import Normalize
from densenet.deploy.explain import Method, explain, overlay
from densenet.deploy.predict import image_files, load_cropped_image
from densenet.errors import ConfigError
from densenet.files import atomic_write
from densenet.weights.registry import load_for_inference


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain", help="heatmaps of where the model looks (Grad-CAM), over each image"
    )
    parser.add_argument(
        "images", nargs="+", type=Path, help="JPEG/PNG files, or folders searched recursively"
    )
    parser.add_argument("--weights", required=True, help="weights file or URL")
    parser.add_argument(
        "--model", help="preset name, for weights that don't carry their config or preprocessing"
    )
    parser.add_argument(
        "--class",
        dest="target",
        metavar="NAME|INDEX",
        help="the class to explain, by name or index (default: each image's top class)",
    )
    parser.add_argument(
        "--layer",
        help="module of model.features whose output is weighed, e.g. denseblock3 (default: the "
        "final feature map, after norm5 and its ReLU)",
    )
    parser.add_argument(
        "--method",
        choices=get_args(Method),
        default="gradcam",
        help="Grad-CAM (mean gradient per channel) or Grad-CAM++ (positive gradients, weighted)",
    )
    parser.add_argument(
        "--multi-label",
        action="store_true",
        help="the outputs are independent labels, as CheXNet's findings: print sigmoid "
        "probabilities instead of softmax ones (weights trained here as multi-label say so "
        "themselves)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for NAME.png (the heatmap over the resized, cropped image) and NAME.npy "
        "(the map, float32 in [0, 1]) per image NAME.*",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a folder")
    loaded = load_for_inference(args.weights, args.model)
    model, preprocessing = loaded.model, loaded.preprocessing
    class_names = loaded.class_names or [str(i) for i in range(model.config.num_classes)]
    target = None if args.target is None else _class_index(args.target, class_names)
    paths = image_files(args.images)
    outputs = _output_names(paths, args.out)
    normalize = Normalize(preprocessing.mean, preprocessing.std)
    for path, out in zip(paths, outputs, strict=True):
        image = load_cropped_image(path, preprocessing, model.config.in_channels)
        result = explain(model, normalize(image[None]), target, args.method, args.layer)
        logits = result.logits[0].float()
        multilabel = args.multi_label or loaded.multilabel
        probabilities = logits.sigmoid() if multilabel else logits.softmax(dim=0)
        index = int(result.targets[0])
        heatmap = result.maps[0]
        args.out.mkdir(exist_ok=True)
        picture = Image.fromarray(overlay(image, heatmap))
        atomic_write(out.with_suffix(".png"), picture.save)
        atomic_write(out.with_suffix(".npy"), partial(np.save, arr=heatmap.numpy()))
        print(
            f"{path}: {class_names[index]} (class {index}) {float(probabilities[index]):.3f} "
            f"-> {out.with_suffix('.png')}"
        )
    return 0


def _class_index(value: str, class_names: list[str]) -> int:
    if value in class_names:
        return class_names.index(value)
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    raise ConfigError(
        f"--class {value!r} is neither a class name ({shown}) nor an index below {len(class_names)}"
    )


def _output_names(paths: list[Path], out: Path) -> list[Path]:
    """``out/STEM`` per image, refused before anything is written if two images share a name or
    an overlay would replace its own image."""
    names = [out / path.stem for path in paths]
    seen: dict[Path, Path] = {}
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise ConfigError(
                f"{seen[name]} and {path} would both be explained as {name}.png; explain them "
                "into different --out folders"
            )
        seen[name] = path
        if name.with_suffix(".png").resolve() == path.resolve():
            raise ConfigError(f"the heatmap of {path} would replace it; choose another --out")
    return names
