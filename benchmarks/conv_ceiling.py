"""How close DenseNet-121 inference comes to this CPU's convolution speed, in float32 or bfloat16.

Collects every convolution of our inference network (after the exact rewrites) with its input
shape, times each alone through oneDNN (weights reordered once, channels_last), and reports:

- the ceiling: the best throughput oneDNN reaches on any of DenseNet-121's own convolutions,
  timed again in turn with the network; the network reaches that rate only if nothing but its
  convolutions costs time and every one runs as fast as the best;
- the convolutions' own time: the sum over the network's convolutions, each timed alone at the
  whole batch; what the network would take if everything that is not a convolution cost nothing
  (the network itself runs each dense block on chunks of the batch, see ``CHUNK_BYTES`` in
  ``densenet.deploy.optimize``);
- the network: ``optimize_for_inference`` timed whole, its FLOP rate and that rate as a share of
  the ceiling.

The measurements take turns in ``--rounds`` rounds, and each figure is the median over rounds with
its range: a single run on a shared machine is not a floor.

    python benchmarks/conv_ceiling.py --dtype bf16 --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from unittest import mock

import torch
from torch import nn

import densenet
from densenet.deploy import optimize
from densenet.hardware import DTYPES
from densenet.tools.bench import results_head

# A convolution as (in channels, out channels, kernel, stride, input shape N, C, H, W).
ConvShape = tuple[int, int, int, int, tuple[int, ...]]


def network_convolutions(network: nn.Module, x: torch.Tensor) -> tuple[Counter[ConvShape], int]:
    """The network's convolutions, counted by shape, and 2 x the multiply-adds of one forward
    pass of ``x`` (convolutions and the classifier)."""
    shapes: Counter[ConvShape] = Counter()
    flops = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            flops += 2 * output.numel() * module.weight[0].numel()
            shape = (module.in_channels, module.out_channels, module.kernel_size[0])
            shapes[(*shape, module.stride[0], tuple(inputs[0].shape))] += 1
        elif isinstance(module, nn.Linear):
            flops += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in network.modules()]
    with torch.inference_mode():
        network(x)
    for hook in hooks:
        hook.remove()
    return shapes, flops


def _conv_flops(shape: ConvShape) -> int:
    in_channels, out_channels, kernel, stride, (n, _, height, width) = shape
    return 2 * n * in_channels * out_channels * kernel**2 * (height // stride) * (width // stride)


def _onednn_conv(shape: ConvShape, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    in_channels, out_channels, kernel, stride, input_shape = shape
    x = torch.randn(input_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, dtype=dtype)
    padding, strides, dilation = [kernel // 2] * 2, [stride] * 2, [1, 1]
    weight = torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, strides, dilation, 1, list(x.shape)
    )
    return lambda: torch.ops.mkldnn._convolution_pointwise(
        x, weight, None, padding, strides, dilation, 1, "none", [], ""
    )


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: oneDNN builds its kernel for the shape on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    median = statistics.median(values) * scale
    low, high = min(values) * scale, max(values) * scale
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round and item")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = densenet.create_model("densenet121").eval()
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    # The ceiling is the machine's at the batch asked for: shapes taken from the whole batch, not
    # from the chunks of it that the network runs each dense block on.
    with mock.patch.object(optimize, "CHUNK_BYTES", sys.maxsize):
        shapes, flops = network_convolutions(
            densenet.optimize_for_inference(model, dtype=dtype, conv_backend="aten"), x.to(dtype)
        )
    network = densenet.optimize_for_inference(model, dtype=dtype)
    convs = {shape: _onednn_conv(shape, dtype) for shape in shapes}

    ceilings, conv_seconds, network_seconds = [], [], []
    with torch.inference_mode():
        network(x)  # warm-up: oneDNN builds its kernels and reorders weights on the first call
        for _ in range(args.rounds):
            alone = {shape: _median_seconds(run, args.repeats) for shape, run in convs.items()}
            conv_seconds.append(sum(count * alone[shape] for shape, count in shapes.items()))
            # This machine's speed can change within seconds: the ceiling's convolution and the
            # network are timed in turn, call by call, so that each share compares the two under
            # the same conditions (and the best shape is timed afresh: the highest of 65 noisy
            # figures would overstate it).
            best = max(shapes, key=lambda shape: _conv_flops(shape) / alone[shape])
            best_calls, network_calls = [], []
            for _ in range(args.repeats):
                best_calls.append(_median_seconds(convs[best], 1))
                network_calls.append(_median_seconds(lambda: network(x), 1))
            ceilings.append(_conv_flops(best) / statistics.median(best_calls))
            network_seconds.append(statistics.median(network_calls))

    rates = [flops / seconds for seconds in network_seconds]
    shares = [rate / ceiling for rate, ceiling in zip(rates, ceilings, strict=True)]
    title = f"DenseNet-121 inference against the convolution ceiling, {args.dtype}"
    lines = results_head(title, "benchmarks/conv_ceiling.py", argv)
    lines += [
        f"- batch {args.batch}, 224 px, channels_last; {len(shapes)} distinct convolution shapes, "
        f"{flops / args.batch / 1e9:.2f} GFLOP per image after the exact rewrites",
        f"- medians over {args.rounds} interleaved rounds (range in brackets), each item the "
        f"median of {args.repeats} calls",
        "",
        "| measure | value |",
        "|---|---|",
        f"| ceiling: best oneDNN convolution (GFLOP/s) | {_spread(ceilings, 1e-9)} |",
        f"| the network's convolutions alone (ms/batch) | {_spread(conv_seconds, 1e3)} |",
        f"| optimize_for_inference (ms/batch) | {_spread(network_seconds, 1e3)} |",
        f"| optimize_for_inference (GFLOP/s) | {_spread(rates, 1e-9)} |",
        f"| optimize_for_inference / ceiling | {_spread(shares, 100, 0)} % |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
