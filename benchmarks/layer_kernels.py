"""What densenet's C layer kernels gain over oneDNN's convolutions in ``optimize_for_inference``.

Builds the network twice from one model: once as it runs here (each bottleneck's clamp fused into
its 1x1 convolution, the 3x3 convolution reading a zero-bordered buffer, a block in one call; see
``densenet.native``), and once with the layer kernels turned off, so that oneDNN runs every
convolution after the clamp kernel. The two are called in turn, ``--rounds`` times per batch size,
and the speed-up is the median of the rounds' ratios with its range. The logits of the two are
compared too: in bf16 they need not be the same bits (sums in another order).

To measure another CPU's code paths on this one, limit oneDNN and build the kernels for that CPU,
e.g. Zen 4's (AVX512_BF16, no AMX) on a Xeon with AMX:

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 DENSENET_KERNEL_MARCH=cooperlake \\
        python benchmarks/layer_kernels.py --dtype bf16 --batch 1 32 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

import densenet
from densenet import native
from densenet.hardware import DTYPES
from densenet.tools.bench import results_head


def _without_layer_kernels(model: densenet.DenseNet, dtype: torch.dtype) -> torch.nn.Module:
    native._layer_kernels.cache_clear()
    try:
        with mock.patch.dict(native.LAYER_KERNELS, {dtype: ()}):
            return densenet.optimize_for_inference(model, dtype=dtype)
    finally:
        native._layer_kernels.cache_clear()


def _with_varied_batchnorm(model: densenet.DenseNet) -> densenet.DenseNet:
    """Statistics and affine terms like a trained model's, unlike a new one's (mean 0, variance 1,
    scale 1, shift 0): each clamp's bounds then fall on both sides of zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _seconds(network: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    network(x)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, help="input size (default: the model's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    kernels = native.layer_kernels_kind(dtype)
    if kernels is None:
        print(f"no layer kernels run here in {args.dtype}: nothing to compare", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    model = _with_varied_batchnorm(densenet.create_model(args.model)).eval()
    size = args.size or densenet.get_spec(args.model).preprocessing.input_size
    networks = {
        "oneDNN": _without_layer_kernels(model, dtype),
        kernels: densenet.optimize_for_inference(model, dtype=dtype),
    }
    title = f"optimize_for_inference with and without the layer kernels, {args.model}"
    lines = results_head(title, "benchmarks/layer_kernels.py", argv)
    lines += [
        f"- {args.dtype}, {size} px, channels_last; layer kernels: {kernels}; medians over "
        f"{args.rounds} rounds of one call each, taking turns (range in brackets)",
        "",
        f"| batch | oneDNN (ms) | {kernels} kernels (ms) | speed-up | largest logit difference |",
        "|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for batch in args.batch:
            x = torch.randn(batch, 3, size, size)
            logits = {name: network(x).float() for name, network in networks.items()}
            difference = (logits["oneDNN"] - logits[kernels]).abs().max().item()
            times: dict[str, list[float]] = {name: [] for name in networks}
            for round_ in range(args.rounds):
                order = list(networks) if round_ % 2 == 0 else list(networks)[::-1]
                for name in order:
                    times[name].append(_seconds(networks[name], x))
            ratios = [a / b for a, b in zip(times["oneDNN"], times[kernels], strict=True)]
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            lines.append(
                f"| {batch} | {medians['oneDNN']:.1f} | {medians[kernels]:.1f} | "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{difference:.3g} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
