"""int8 (post-training static quantization) next to float32: top-1 agreement and speed.

Agreement is measured twice: on a real task (a small DenseNet trained for a few seconds on
sklearn's 8x8 digits, int8 against float32 on the held-out split, plus the int8 accuracy) and on
DenseNet-121 with random inputs (its weights are freshly initialised: no pretrained weights can be
downloaded here). Speed is DenseNet-121 at 224 px, the compiled int8 network against our float32
optimize_for_inference and torchvision's default, timed in turns in one run.

    python benchmarks/int8.py --threads 2 --batch 1 --output benchmarks/results/int8.md
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import densenet
from densenet.tools.bench import (
    TORCHVISION_DEFAULT,
    Candidate,
    results_head,
    time_candidates,
    torchvision_twin,
)

CALIBRATION_IMAGES = 32  # DenseNet-121, random inputs, in batches of 8
AGREEMENT_IMAGES = 64


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def digits_agreement() -> list[str]:
    """Train a small DenseNet on digits, quantize it, compare on the held-out images."""
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y))
    x, y = x[order], y[order]
    x_train, x_test, y_test = x[:1400], x[1400:], y[1400:]
    model = densenet.DenseNet(
        growth_rate=8, block_config=(3, 3), num_init_features=16, stem="cifar",
        in_channels=1, num_classes=10,
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(model(x_train[batch]), y[:1400][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    calibration = list(x_train[:512].split(64))
    eager = densenet.quantize_int8(model, calibration)
    compiled = densenet.quantize_int8(model, calibration, compile=True)
    with torch.inference_mode():
        fp32, int8_eager, int8_compiled = model(x_test), eager(x_test), compiled(x_test)

    def accuracy(logits: torch.Tensor) -> str:
        return f"{(logits.argmax(1) == y_test).float().mean().item():.2%}"

    return [
        f"- digits (sklearn, {len(y_test)} held-out 8x8 images, small DenseNet-BC trained 300 "
        f"steps, int8 calibrated on 512 training images): accuracy fp32 {accuracy(fp32)}, int8 "
        f"{accuracy(int8_compiled)} (compiled) / {accuracy(int8_eager)} (eager); top-1 agreement "
        f"with fp32 {top1_agreement(int8_compiled, fp32):.2%} (compiled), "
        f"{top1_agreement(int8_eager, fp32):.2%} (eager)"
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    title = "int8 next to float32 (DenseNet-121 speed; top-1 agreement)"
    lines = results_head(title, "benchmarks/int8.py", argv)
    lines += digits_agreement()
    print("\n".join(lines), flush=True)

    torch.manual_seed(0)
    model = densenet.create_model("densenet121").eval()
    calibration = [torch.randn(8, 3, 224, 224) for _ in range(CALIBRATION_IMAGES // 8)]
    started = time.perf_counter()
    int8 = densenet.quantize_int8(model, calibration, compile=True)
    fp32 = densenet.optimize_for_inference(model)
    x = torch.randn(AGREEMENT_IMAGES, 3, 224, 224)
    with torch.inference_mode():
        fp32_logits = fp32(x)
        agreement = top1_agreement(int8(x), fp32_logits)  # the first call compiles
    classes = fp32_logits.argmax(1).unique().numel()
    lines.append(
        f"- DenseNet-121 (fresh weights), {AGREEMENT_IMAGES} random N(0,1) inputs, calibrated on "
        f"{CALIBRATION_IMAGES} others: top-1 agreement int8 (compiled) vs fp32 {agreement:.2%} "
        f"(fp32 predicts {classes} distinct classes on them); quantize + compile "
        f"{time.perf_counter() - started:.0f} s"
    )
    lines += ["", "| batch | configuration | ms/batch (median) | fastest-slowest round | img/s "]
    lines[-1] += "| vs torchvision default |"
    lines.append("|---|---|---|---|---|---|")
    print(lines[-4], flush=True)

    twin = torchvision_twin(model)
    assert twin is not None
    candidates = [
        Candidate(TORCHVISION_DEFAULT, "fp32", lambda: twin, False),
        Candidate("ours, optimize_for_inference (fp32, oneDNN convs)", "fp32", lambda: fp32, True),
        Candidate("ours, quantize_int8 + compile (int8)", "int8", lambda: int8, True),
    ]
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        timings = time_candidates(candidates, x, warmup=2, rounds=args.rounds)
        reference = timings[0].seconds_per_batch
        for timing in timings:
            lines.append(
                f"| {batch} | {timing.name} | {timing.seconds_per_batch * 1e3:.1f} "
                f"| {min(timing.seconds) * 1e3:.1f}-{max(timing.seconds) * 1e3:.1f} "
                f"| {timing.images_per_second:.1f} | {reference / timing.seconds_per_batch:.2f}x |"
            )
            print(lines[-1], flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
