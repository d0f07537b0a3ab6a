"""``densenet train``: train a DenseNet with a recipe, resumably, into a run directory."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import typing
from pathlib import Path
from typing import Literal

from densenet.errors import ConfigError, DenseNetError
from densenet.hardware import resolve_device
from densenet.training.config import (
    FIELD_TYPES,
    FIELDS,
    check_resume_overrides,
    list_recipes,
    resolve,
    tomllib,
)
from densenet.training.distributed import distributed_session, from_main, rank_device, stop_together
from densenet.training.loop import train
from densenet.training.rundir import RunDirectory
from densenet.weights.registry import get_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a DenseNet (no arguments: the built-in digits dataset, a few minutes on a CPU)",
        description="Train with a recipe; every recipe setting can be overridden by its flag. "
        f"Shipped recipes: {', '.join(list_recipes())}.",
    )
    parser.add_argument(
        "--recipe", help="a shipped recipe name or a TOML file (default: the dataset's recipe)"
    )
    parser.add_argument("--out", type=Path, help="run directory (default runs/DATASET-MODEL-TIME)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run exactly")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    settings = parser.add_argument_group("settings (each overrides the recipe)")
    for name, field in FIELDS.items():
        kind = FIELD_TYPES[name]
        flag = "--" + name.replace("_", "-")
        common = {"dest": name, "default": argparse.SUPPRESS, "help": field.metadata["help"]}
        if name == "model_overrides":
            settings.add_argument(
                "--model-override", action="append", metavar="KEY=VALUE", **common
            )
        elif kind is bool:
            settings.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            settings.add_argument(flag, nargs="+", type=float, metavar="X", **common)
        elif typing.get_origin(kind) is Literal:
            settings.add_argument(flag, choices=typing.get_args(kind), **common)
        else:
            settings.add_argument(flag, type=kind, metavar=name.upper(), **common)
    parser.set_defaults(run=run)


def _parse_model_overrides(items: list[str]) -> dict[str, object]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-override expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value  # a bare word, e.g. stem=cifar
    return overrides


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    if "model_overrides" in overrides:
        overrides["model_overrides"] = _parse_model_overrides(overrides["model_overrides"])
    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume is not None:
        if args.recipe or args.out:
            raise ConfigError("--resume continues a run with its own config: drop --recipe/--out")
        run_dir = RunDirectory(args.resume)
        config = check_resume_overrides(run_dir.check_resumable(), overrides)
        with distributed_session(resolve_device(config.device)):
            train(config, run_dir, resume=True, progress=progress)
        return 0
    config = resolve(args.recipe, overrides)
    get_spec(config.model).config.replace(**config.model_overrides)  # fail before any work
    # Under torchrun, join the other processes first: only the main one may make the directory.
    device = resolve_device(config.device)
    with distributed_session(device) as context:
        # Processes may start in different seconds: the main one's clock names the directory.
        stamp = from_main(time.strftime("%Y%m%d-%H%M%S"))
        run_dir = RunDirectory(
            args.out or Path("runs") / f"{config.dataset}-{config.model}-{stamp}"
        )
        existed = run_dir.path.exists()
        with stop_together(rank_device(device, context)):
            run_dir.create()
        try:
            train(config, run_dir, progress=progress)
        except DenseNetError:
            # Nothing was trained: don't leave an empty run directory behind.
            if not existed and context.is_main:
                with contextlib.suppress(OSError):
                    run_dir.path.rmdir()
            raise
    return 0
