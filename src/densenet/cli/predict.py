"""``densenet predict IMAGE... --weights FILE``: top-k labels with probabilities."""

from __future__ import annotations

import argparse

from densenet.deploy.predict import Predictor
from densenet.errors import ConfigError
from densenet.weights.io import read_checkpoint
from densenet.weights.registry import create_model, get_spec, model_from_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="classify image files")
    parser.add_argument("images", nargs="+", help="JPEG/PNG files of any size")
    parser.add_argument("--weights", required=True, help="weights file or URL")
    parser.add_argument(
        "--model",
        help="preset name, for weights that don't carry their config or preprocessing "
        "(e.g. torchvision checkpoints): the preset's preprocessing is used",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(run=run)


def build_predictor(weights: str, model_name: str | None) -> Predictor:
    checkpoint = read_checkpoint(weights)
    preprocessing = checkpoint.preprocessing
    if checkpoint.config is None or preprocessing is None:
        if model_name is None:
            raise ConfigError(
                f"{weights} does not record its architecture and preprocessing; "
                "say which preset it is with --model NAME"
            )
        preprocessing = get_spec(model_name).preprocessing
    if checkpoint.config is None:
        model = create_model(model_name, weights=checkpoint)  # type: ignore[arg-type]
    else:
        model = model_from_checkpoint(checkpoint)
    return Predictor(model, preprocessing, checkpoint.class_names)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError("--top-k and --batch-size must be at least 1")
    predictor = build_predictor(args.weights, args.model)
    for prediction in predictor.predict(args.images, args.top_k, args.batch_size):
        labels = ", ".join(f"{label} {probability:.3f}" for label, probability in prediction.top)
        print(f"{prediction.path}: {labels}")
    return 0
