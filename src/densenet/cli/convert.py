"""``densenet convert SOURCE --output FILE.safetensors``: any supported weights, once, into the
project's self-describing format."""

from __future__ import annotations

import argparse
import os

from densenet.cli.arguments import output_file
from densenet.errors import ConfigError
from densenet.files import write_error
from densenet.weights.download import is_url
from densenet.weights.io import looks_like_a_file, save_weights
from densenet.weights.pretrained import PUBLISHED, find_published
from densenet.weights.registry import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert torchvision/timm/Keras weights to the project's .safetensors format",
    )
    parser.add_argument(
        "source", help="a weights file, a URL, or a published name such as densenet121.tv_in1k"
    )
    parser.add_argument("--output", "-o", required=True, type=output_file, help="FILE.safetensors")
    parser.add_argument(
        "--model", help="the preset the weights are for (needed unless SOURCE names it)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.output.suffix != ".safetensors":
        raise ConfigError(f"--output must end in .safetensors, got {args.output}")
    source = os.fspath(args.source)
    published = PUBLISHED.get(source)
    if published is None and args.model and not is_url(source) and not looks_like_a_file(source):
        published = find_published(args.model, source)
    meta: dict[str, object] = {"converted_from": source}
    if published is not None:
        meta |= {
            "published": published.name,
            "url": published.url,
            "top1": published.top1,
            "top5": published.top5,
            "preprocessing": published.preprocessing.to_dict(),
        }
    model, _ = load_model(source, args.model or (published.model if published else None))
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(args.output, error) from None
    save_weights(model, args.output, meta=meta)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} ({params / 1e6:.2f}M parameters)")
    return 0
