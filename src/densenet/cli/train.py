"""``densenet train``: train a DenseNet with a recipe, resumably, into a run directory."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from densenet.errors import ConfigError, DenseNetError, Interrupted
from densenet.hardware import resolve_device
from densenet.training.config import (
    FIELD_TYPES,
    FIELDS,
    TrainConfig,
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
        try:
            config = check_resume_overrides(run_dir.check_resumable(), overrides)
            with distributed_session(resolve_device(config.device)), _resume_hint(run_dir):
                train(config, run_dir, resume=True, progress=progress)
        finally:
            run_dir.release()
        return 0
    config = resolve(args.recipe, overrides)
    get_spec(config.model).config.replace(**config.model_overrides)  # fail before any work
    # Under torchrun, join the other processes first: only the main one may make the directory.
    device = resolve_device(config.device)
    with distributed_session(device) as context:
        with stop_together(rank_device(device, context)):
            run_dir = RunDirectory(from_main(_run_path(args.out, config, context.is_main)))
            run_dir.create()
        try:
            with _resume_hint(run_dir):
                train(config, run_dir, progress=progress)
        except DenseNetError:
            run_dir.abandon()  # failed before writing its config: leave nothing behind
            raise
        finally:
            run_dir.release()
    return 0


def _run_path(out: Path | None, config: TrainConfig, is_main: bool) -> Path | None:
    """``--out``, or a new directory named by the main process (only it may make one)."""
    if out is not None or not is_main:
        return out
    # Two runs started in the same second get two directories: the name is taken by mkdir.
    name = f"{config.dataset}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunDirectory.new_default(Path("runs"), name).path


@contextlib.contextmanager
def _resume_hint(run_dir: RunDirectory) -> Iterator[None]:
    """Ctrl-C says how to continue once the run has saved a state to continue from."""
    try:
        yield
    except KeyboardInterrupt:
        if (run_dir / run_dir.STATE).exists():
            raise Interrupted(
                f"the run is saved up to its last checkpoint; continue with: densenet train "
                f"--resume {run_dir.path}"
            ) from None
        raise
