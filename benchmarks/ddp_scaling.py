"""Scaling of data-parallel training: training img/s with 1 process and with N processes (torchrun).

Trains the digits recipe's network for a few epochs each way and reads the throughput that
`densenet train` records in metrics.csv (global images per second of training compute, the first
epoch left out as warm-up). Run it under the benchmark lock:

    flock /tmp/densenet-bench.lock .venv/bin/python benchmarks/ddp_scaling.py
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from densenet.tools.bench import machine_kind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, processes: int, threads: int, args: list[str]) -> float:
    if processes == 1:
        command = [sys.executable, "-m", "densenet"]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
        ]
        command += [
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "densenet",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(
        [*command, "train", "--out", str(out), *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))[1:]  # the first epoch warms up
    return sum(float(r["img_per_s"]) for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, help="default: results/ddp_scaling_MACHINE-KIND.md")
    args = parser.parse_args()
    kind = machine_kind(torch.device("cpu"))
    args.out = args.out or Path(f"benchmarks/results/ddp_scaling_{kind}.md")
    cores = os.cpu_count() or 1
    common = ["--epochs", str(args.epochs), "--precision", args.precision, "--no-progress"]
    common += ["--batch-size", "128"]
    cases = [
        ("1 process", 1, cores, []),
        (f"{args.processes} processes (gloo)", args.processes, max(cores // args.processes, 1), []),
        (
            f"{args.processes} processes (gloo), --sync-bn",
            args.processes,
            max(cores // args.processes, 1),
            ["--sync-bn"],
        ),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, processes, threads, extra) in enumerate(cases):
            rate = train(Path(tmp) / str(i), processes, threads, [*common, *extra])
            rows.append((name, processes, threads, extra, rate))
            print(f"{name}, {threads} threads each: {rate:.0f} img/s", flush=True)
    base = rows[0][4]
    lines = [
        "# Data-parallel scaling (digits recipe network, DenseNet-BC 3x3 blocks, batch 128)",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {cores} CPU cores, no GPU",
        f"- torch {torch.__version__}, precision {args.precision}, channels_last",
        f"- load average when done (the machine is shared): {os.getloadavg()[0]:.1f}",
        f"- command: `flock /tmp/densenet-bench.lock .venv/bin/python benchmarks/ddp_scaling.py"
        f" --processes {args.processes} --epochs {args.epochs} --precision {args.precision}`",
        "- img/s: global training images per second of compute (metrics.csv), mean over epochs"
        " 2.., the first epoch being warm-up; each run uses all cores (threads = cores/processes)",
        "",
        "| run | processes | threads each | img/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for name, processes, threads, _, rate in rows:
        lines.append(f"| {name} | {processes} | {threads} | {rate:.0f} | {rate / base:.2f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
