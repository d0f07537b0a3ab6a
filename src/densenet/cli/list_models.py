"""``densenet list``: the presets with their size, input and the paper's error rates."""

from __future__ import annotations

import argparse

import torch

from densenet.weights.registry import create_model, get_spec, list_models


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the model presets")
    parser.add_argument(
        "pattern", nargs="?", default="*", help="shell-style filter, e.g. 'densenet_bc*'"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(f"{'name':<20}{'params':>12}{'input':>8}  {'paper error (%)':<56}description")
    for name in list_models(args.pattern):
        spec = get_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            params = sum(p.numel() for p in create_model(name).parameters())
        size = spec.preprocessing.input_size
        errors = ", ".join(f"{key} {value:.2f}" for key, value in spec.paper_error.items())
        print(f"{name:<20}{params / 1e6:>11.2f}M{size:>8}  {errors:<56}{spec.description}")
    return 0
