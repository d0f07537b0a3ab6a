"""``densenet summary NAME``: the paper's Table 1 for any preset, measured by running it."""

from __future__ import annotations

import argparse

from densenet.cli.arguments import positive_int
from densenet.errors import ConfigError
from densenet.models.presets import MAX_IMAGE_SIZE
from densenet.tools.summary import format_summary, summarize
from densenet.weights.registry import create_model, get_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary", help="per-stage output sizes, parameters, MACs and activation memory"
    )
    parser.add_argument("name", help="model preset (see `densenet list`)")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        help="batch size for activation memory (batches above 4 are extrapolated, exactly, from "
        "runs of 2 and 4)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    spec = get_spec(args.name)
    size = args.input_size or (spec.preprocessing.input_size,) * 2
    if max(size) > MAX_IMAGE_SIZE:
        # The summary runs the model at this size: the size decides the memory it takes.
        raise ConfigError(
            f"--input-size {size[0]} {size[1]} is larger than the {MAX_IMAGE_SIZE} px per side "
            "allowed"
        )
    model = create_model(args.name)
    model.config.stage_sizes(*size)  # a clear error before any computation
    title = f"{args.name}: {spec.description}, input {size[0]}x{size[1]}"
    print(format_summary(title, summarize(model, tuple(size), args.batch)))
    return 0
