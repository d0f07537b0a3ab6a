"""The fastest DenseNet-121 forward pass this CPU allows in float32, from its convolution FLOPs.

Counts the multiply-adds of every convolution and the classifier of our inference network
(after the exact rewrites) at 224 px, measures the best throughput oneDNN reaches on
DenseNet-121's own convolution shapes, and divides: no exact float32 implementation can be faster
than that, whatever it does with the rest. Compare with torchvision's batch-1 latency from
`densenet bench` to see which latency targets are reachable at all.

    python benchmarks/conv_ceiling.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import densenet
from densenet.tools.bench import machine_description

# (in channels, out channels, kernel, input size): DenseNet-121's convolutions at batch 1.
SHAPES = [(128, 32, 3, 56), (128, 32, 3, 28), (160, 128, 1, 56), (480, 128, 1, 28)]


def forward_flops(network: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of every convolution and linear layer for one forward pass of ``x``."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += 2 * output.numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in network.modules()]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    return total


def best_conv_flops_per_second(repeats: int = 20) -> float:
    """The best of oneDNN's throughputs over SHAPES (weights reordered once, channels_last)."""
    best = 0.0
    for in_channels, out_channels, kernel, size in SHAPES:
        x = torch.randn(1, in_channels, size, size).contiguous(memory_format=torch.channels_last)
        conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), conv.padding, conv.stride, conv.dilation, 1, list(x.shape)
        )

        def run(x=x, weight=weight, conv=conv) -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, None, conv.padding, conv.stride, conv.dilation, 1, "none", [], ""
            )

        for _ in range(3):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        flops = 2 * in_channels * out_channels * kernel * kernel * size * size
        best = max(best, flops / statistics.median(times))
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args(argv)
    network = densenet.optimize_for_inference(
        densenet.create_model("densenet121").eval(), conv_backend="aten"
    )
    flops = forward_flops(network, torch.randn(1, 3, 224, 224))
    for line in machine_description(torch.device("cpu")):
        print(f"- {line}")
    print(f"- DenseNet-121 after the exact rewrites: {flops / 1e9:.2f} GFLOP per 224 px image")
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            peak = best_conv_flops_per_second()
        print(
            f"- {threads} thread(s): best oneDNN convolution {peak / 1e9:.1f} GFLOP/s -> "
            f"batch-1 latency >= {flops / peak * 1e3:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
