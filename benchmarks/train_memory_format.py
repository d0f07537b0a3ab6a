"""Training step time, NCHW vs channels_last, of the networks `densenet train` uses on small images.

The two layouts alternate every few steps, so load from other processes on a shared machine
affects both alike; the medians of the per-round step times are compared.

    flock /tmp/densenet-bench.lock .venv/bin/python benchmarks/train_memory_format.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from densenet import create_model

CASES = {
    # name: (preset, overrides, input channels, image size, batch)
    "digits recipe (BC k=12, 3x3 layers, 8px, batch 64)": (
        "densenet_bc100_k12",
        {"block_config": (3, 3, 3)},
        1,
        8,
        64,
    ),
    "densenet_bc100_k12 (CIFAR, 32px, batch 64)": ("densenet_bc100_k12", {}, 3, 32, 64),
}


def step_time(model, optimizer, images, labels, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, fp32, rounds {args.rounds} x {args.steps} steps"
    )
    print("| network | NCHW ms/step | channels_last ms/step | NCHW / channels_last |")
    print("|---|---|---|---|")
    for name, (preset, overrides, channels, size, batch) in CASES.items():
        runs = {}
        for layout in ("nchw", "channels_last"):
            torch.manual_seed(0)
            model = create_model(preset, num_classes=10, in_channels=channels, **overrides)
            images = torch.randn(batch, channels, size, size)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            labels = torch.randint(0, 10, (batch,))
            step_time(model, optimizer, images, labels, 2)  # warm-up
            runs[layout] = (model, optimizer, images, labels, [])
        for _ in range(args.rounds):
            for model, optimizer, images, labels, times in runs.values():
                times.append(step_time(model, optimizer, images, labels, args.steps))
        nchw = statistics.median(runs["nchw"][4]) * 1000
        last = statistics.median(runs["channels_last"][4]) * 1000
        print(f"| {name} | {nchw:.1f} | {last:.1f} | {nchw / last:.2f} |")


if __name__ == "__main__":
    main()
