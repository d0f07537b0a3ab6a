"""``densenet bench NAME``: inference speed of ours next to torchvision's, in one run."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from densenet.deploy.optimize import INFERENCE_PRECISIONS
from densenet.errors import ConfigError
from densenet.files import atomic_write
from densenet.hardware import resolve_device
from densenet.tools.bench import (
    TORCHVISION_DEFAULT,
    Timing,
    candidates,
    machine_description,
    time_candidates,
    torchvision_peer,
)
from densenet.weights.registry import create_model, get_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="inference throughput and latency against torchvision's DenseNet"
    )
    parser.add_argument("name", help="model preset (see `densenet list`)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32], metavar="N")
    parser.add_argument(
        "--precision", nargs="+", choices=INFERENCE_PRECISIONS, default=["fp32", "bf16"]
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd runs (slow to warm up)"
    )
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per configuration")
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="timed rounds, each calling every configuration once in turn (median and range shown)",
    )
    parser.add_argument("--output", type=Path, help="also write the results as Markdown here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    spec = get_spec(args.name)
    if any(batch < 1 for batch in args.batch):
        raise ConfigError(f"--batch sizes must be >= 1, got {args.batch}")
    if args.rounds < 1 or args.warmup < 0:
        raise ConfigError(
            f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}"
        )
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    size = args.input_size or (spec.preprocessing.input_size,) * 2
    model = create_model(args.name).eval()
    model.config.stage_sizes(*size)
    torch.manual_seed(0)

    lines = [f"# densenet bench {args.name}, input {size[0]}x{size[1]}, device {device}", ""]
    lines += [f"- {line}" for line in machine_description(device)]
    lines += [f"- command: `{_command_line(args)}`", ""]
    print("\n".join(lines), flush=True)

    configurations = candidates(model, device, args.precision, args.compile)
    header = (
        "| batch | precision | configuration | ms/batch (median) | fastest-slowest round "
        "| img/s | vs torchvision run the same way | vs torchvision default "
        "| vs best torchvision same precision |"
    )
    table = [header, "|---|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    for batch in args.batch:
        x = torch.randn(batch, model.config.in_channels, *size, device=device)
        timings = time_candidates(configurations, x, warmup=args.warmup, rounds=args.rounds)
        for timing in timings:
            row = _row(timing, timings)
            table.append(row)
            print(row, flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join([*lines, *table]) + "\n"
        atomic_write(args.output, lambda tmp: tmp.write_text(text))
        print(f"\nwrote {args.output}")
    return 0


def _row(timing: Timing, so_far: list[Timing]) -> str:
    """One result, with ratios against the torchvision runs timed before it in this batch size."""
    default = next((t for t in so_far if t.name == TORCHVISION_DEFAULT), None)
    stock = [
        t for t in so_far if t.name.startswith("torchvision") and t.precision == timing.precision
    ]
    best = min(stock, key=lambda t: t.seconds_per_batch) if stock else None
    peer = next((t for t in so_far if t.name == torchvision_peer(timing.name)), None)

    def ratio(reference: Timing | None, named: bool = True) -> str:
        if reference is None or timing.name.startswith("torchvision"):
            return "-"
        times = f"{reference.seconds_per_batch / timing.seconds_per_batch:.2f}x"
        return f"{times} ({reference.name})" if named else times

    return (
        f"| {timing.batch} | {timing.precision} | {timing.name} "
        f"| {timing.seconds_per_batch * 1e3:.1f} "
        f"| {min(timing.seconds) * 1e3:.1f}-{max(timing.seconds) * 1e3:.1f} "
        f"| {timing.images_per_second:.1f} "
        f"| {ratio(peer, named=False)} | {ratio(default)} | {ratio(best)} |"
    )


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, with every setting spelled out."""
    words = ["densenet", "bench", args.name, "--batch", *map(str, args.batch)]
    words += ["--precision", *args.precision, "--device", args.device]
    words += ["--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.compile:
        words.append("--compile")
    if args.input_size:
        words += ["--input-size", *map(str, args.input_size)]
    if args.output:
        words += ["--output", str(args.output)]
    return shlex.join(words)
