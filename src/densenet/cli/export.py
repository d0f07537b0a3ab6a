"""``densenet export``: write the inference network as ONNX, TorchScript or an exported program."""

from __future__ import annotations

import argparse

from densenet.deploy.export import FORMATS, export_model
from densenet.deploy.optimize import INFERENCE_PRECISIONS
from densenet.weights.registry import create_model, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export for deployment (ONNX, TorchScript, torch.export) and check the result",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights", help="a .safetensors file written by densenet (self-describing)"
    )
    source.add_argument(
        "--model", help="a preset name, with freshly initialised weights (for trying deployment)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="fp32")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.weights)[0] if args.weights else create_model(args.model)
    size = tuple(args.input_size) if args.input_size else None
    report = export_model(
        model, args.output, args.format, precision=args.precision, input_size=size
    )
    print(
        f"wrote {report.path} ({report.format}, {report.precision}, dynamic batch); "
        f"checked at batch {report.check_batch} against the fp32 eager model: max difference "
        f"{report.max_abs_diff:.3g} ({report.relative_diff:.3g} relative, tolerance "
        f"{report.tolerance:g})"
    )
    return 0
