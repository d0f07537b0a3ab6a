"""Peak RSS growth of one 3x3 convolution's forward and backward, float32 against bfloat16.

On CPUs without native bf16 (no AVX-512-BF16/AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
is False) PyTorch runs bf16 convolutions outside oneDNN, with a workspace several times the input.
That workspace is the same for every DenseNet implementation and dilutes training-memory ratios
measured under emulated bf16. Each dtype runs in a fresh process (peak RSS is per process).

    python benchmarks/conv_workspace.py   # DenseNet-121 block-1 shape: 32 x 128 x 56 x 56 -> 32
"""

from __future__ import annotations

import resource
import subprocess
import sys

import torch


def child(dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(2)
    layout = torch.channels_last
    x = torch.randn(32, 128, 56, 56).to(dtype=dtype, memory_format=layout).requires_grad_()
    weight = torch.randn(32, 128, 3, 3, dtype=dtype, requires_grad=True)

    def peak_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    before = peak_gb()
    out = torch.nn.functional.conv2d(x, weight, padding=1)
    forward = peak_gb() - before
    out.backward(torch.ones_like(out))
    total = peak_gb() - before
    size = x.numel() * x.element_size() / 2**30
    print(f"| {dtype_name} | {size:.3f} | {forward:.3f} | {total:.3f} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    print(
        f"torch {torch.__version__}, oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
        "2 threads, channels_last input 32 x 128 x 56 x 56, 3x3 conv to 32 channels\n"
    )
    print("| dtype | input (GB) | peak RSS growth, forward (GB) | forward + backward (GB) |")
    print("|---|---|---|---|")
    for dtype_name in ("float32", "bfloat16"):
        subprocess.run([sys.executable, __file__, "--child", dtype_name], check=True)


if __name__ == "__main__":
    main()
