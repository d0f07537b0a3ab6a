"""Small C kernels for memory-bound passes over channels_last CPU data, compiled on this machine on
first use.

Beside its convolutions, ``optimize_for_inference``'s network spends its time in three passes over
memory (see :mod:`densenet.deploy.optimize`), each slower in ATen than it needs to be:

- the per-layer clamp over every channel a layer reads: ATen's clamp with per-channel bounds
  converts each bf16 element to float and back with rounding; ``kernels.c`` widens and narrows by
  bit shifts, exact for a clamp, and runs near memory speed (2.8x faster than ``torch.clamp`` on
  DenseNet-121's block-1 shape, 2-vCPU Xeon with AMX);
- a transition's clamp and 2x2 average pooling, fused into one pass that writes a quarter of the
  data;
- the ImageNet stem's 3x3 stride-2 max pooling.

Each gives the same bits as the ATen operations it replaces (tests compare them).

Where the compiler targets AVX-512 or AVX2 (float32) or AVX512_BF16 (bf16: on AMX's tile unit where
it targets AMX, else with vdpbf16ps, for AMD's Zen 4 say), three more run the dense layers' and
transitions' convolutions themselves, summing in float32 (bf16: rounding once, as oneDNN does):

- :func:`clamp_conv1x1`, a bottleneck's clamp together with its 1x1 convolution, bias and ReLU,
  or a transition's clamp, 2x2 average pooling and 1x1 convolution: each thread clamps a few
  pixels (12, or 32 on AMX) into a buffer that stays in its cache and multiplies them
  there, so the clamped input, which oneDNN's convolution would read back from memory, is never
  written;
- :func:`conv3x3`, a layer's 3x3 convolution, which reads the 1x1's output from a buffer with a
  zero border (:func:`bordered_buffer`): each of the nine taps of consecutive positions is then
  consecutive pixels of the buffer, with no padding to handle, and the result goes straight into
  the block tensor's channels instead of being copied there;
- :func:`dense_block`, a block's layers one after the other in one call: a layer on a 7x7 image
  takes less time than Python's two calls into C did, and each kernel reads the next one's
  weights ahead into the cache while it computes.

On the 2-vCPU Xeon with AMX, DenseNet-121's logits came out bit-identical to oneDNN's in bf16 and
within float32 rounding of them (the same error against float64), and the network ran 2.8x
faster in bf16 and 1.45x in float32 at batch 1 than with oneDNN's convolutions (medians of 15
alternating in-process rounds; see docs/inference.md).

Memory-efficient training (:mod:`densenet.models.efficient`) uses five more, in bf16 and float32,
each computing in float (and rounding once to bf16):

- :func:`norm_relu`, BN with given statistics and ReLU in one pass that reads a layer's input
  straight from the block tensor's slice, where ATen copies the slice to a dense tensor (its BN
  kernel is several times slower on strided data), normalises it and runs ReLU: three passes;
- :func:`norm_input_gradient`, BN's input gradient from its per-channel sums, added straight to the
  block's gradient accumulator (or written over the incoming gradient). ATen's kernel allocates two
  tensors the size of the layer's input for it (a different size in every layer of a block, which
  leaves glibc's heap full of holes), and adding it to the accumulator takes another pass and a
  second rounding;
- :func:`norm_sums`, BN's two per-channel backward sums, with the ReLU's backward folded in:
  one pass over the gradient, the ReLU's output and the input slice, where ATen first writes the
  ReLU's gradient and copies the slice to a dense tensor;
- :func:`norm_relu_sums`, the same sums with the ReLU's output recomputed from the input slice
  (and written for the convolution's weight gradient) in the same pass, which reads x once for
  both; :func:`norm_input_gradient` can take the ReLU from x the same way;
- :func:`norm_stats`, a new feature map's batch mean and variance in two read-only passes, where
  BN's training kernel also writes a normalised copy (and, in bf16, rounds the statistics to bf16).

Each kernel splits its pixels across torch's thread count with OpenMP, built with ``-fopenmp``
against the ``libgomp.so.1`` that PyTorch's Linux wheels have already loaded: the kernels run on
PyTorch's own OpenMP threads, which are still spinning from its last operation. Threads of the
kernels' own (a Python thread pool, say) would have to be woken for every call, and on a
2-vCPU VM that cost most of what the split saved: DenseNet-121 bf16 inference at batch 32 ran
1.28x faster with OpenMP (Xeon with AMX, median of 4 alternating processes of each version).
In a forked child they need one thread, as PyTorch's own operations do (DataLoader workers are
set to one): OpenMP's threads don't survive a fork.

The library is built with the machine's C compiler for its own CPU (``-march=native``, or the
level in ``$DENSENET_KERNEL_MARCH``) into the densenet cache directory, under a name that hashes
the source, the flags, the compiler and the CPU, so a cache shared between machines never hands
one CPU's code to another. Where it can't be built (no compiler, a read-only cache),
:func:`available` is false after one warning, and callers use ATen: more slowly, and for the
clamps and pools the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from densenet.files import cache_dir
from densenet.hardware import cpu_info

SOURCE = Path(__file__).with_name("kernels.c")
# Without OpenMP (a compiler lacking its runtime, say) the kernels still build, on one thread.
OPENMP_FLAGS = ("-fopenmp",)
COMPILE_TIMEOUT_S = 120
# Each thread takes at least this many elements: below it a pass takes a few microseconds, and
# starting OpenMP's threads on it costs about as much as they save.
PARALLEL_MIN_ELEMENTS = 1 << 14
# The same for the convolution kernels, in multiply-adds: about 10 us of one core's work.
PARALLEL_MIN_MULTIPLY_ADDS = 1 << 20
# The dtypes that the max pooling and memory-efficient training's BN kernels take: the endings of
# their names in kernels.c.
KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float32: "float"}
# The kernels that run a bottleneck layer's convolutions, by dtype, the fastest first: their names'
# endings in kernels.c (bf16 on AMX's tile unit, else with AVX512_BF16's vdpbf16ps). The most
# input channels clamp_conv1x1 takes: its buffer of clamped pixels lives on each OpenMP thread's
# stack (256 KiB at most, and 32 KiB of bounds in bf16). And the most
# pixels past the end of a bordered buffer that the kernels' last tiles read (AMX_PIXELS, the
# larger tile, in kernels.c).
LAYER_KERNELS = {torch.bfloat16: ("amx", "dpbf16"), torch.float32: ("float",)}
LAYER_MAX_CHANNELS = 4096
BORDERED_SPARE_PIXELS = 32
# The layer kernels' last arguments but one: weights to read ahead while they compute (dense_block
# passes the next kernel's), none when called alone.
_NO_PREFETCH = (None, ctypes.c_int64(0))


def available() -> bool:
    """Whether the kernels are built and loaded (building them now if that has not been tried)."""
    return _library() is not None


def supports_clamp(x: Tensor) -> bool:
    """Whether :func:`clamp_channels` and :func:`clamp_avg_pool2` take ``x``: a CPU bf16
    channels_last 4-D tensor, or a slice of one along channels, needing no gradient."""
    return _kernel_pixels(x, torch.bfloat16)


def supports_max_pool(x: Tensor) -> bool:
    """Whether :func:`max_pool_3x3s2` takes ``x``: a dense channels_last CPU bf16 or float32
    4-D tensor needing no gradient."""
    return (
        x.dtype in KERNEL_DTYPES
        and _plain_cpu_4d(x)
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def supports_norm_relu(x: Tensor, out: Tensor) -> bool:
    """Whether :func:`norm_relu` takes these: CPU bf16 or float32 4-D tensors of one shape and
    dtype, ``x`` channels_last or a slice of one along channels, ``out`` dense channels_last."""
    return _kernel_pixels(x) and _dense_like(out, x)


def norm_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``relu(x * scale + shift)`` with float32 per-channel factors (shape ``[C]``), computed in
    float (and, in bf16, rounded once: with AVX512_BF16 by its conversion, which reads float
    denormals as zero), into ``out``, for tensors that :func:`supports_norm_relu`."""
    library = _checked(supports_norm_relu(x, out))
    n, channels, height, width = x.shape
    factors = [f.float().contiguous() for f in (scale, shift)]
    rows = n * height * width
    getattr(library, f"norm_relu_{KERNEL_DTYPES[x.dtype]}")(
        _at(x),
        ctypes.c_int64(x.stride(3)),
        _at(out),
        *(ctypes.c_int64(v) for v in (rows, channels)),
        *(_at(f) for f in factors),
        _threads(rows * channels),
    )
    return out


def supports_norm_input_gradient(
    target: Tensor, grad: Tensor, x: Tensor, relu_output: Tensor | None = None
) -> bool:
    """Whether :func:`norm_input_gradient` takes these: CPU bf16 or float32 4-D tensors of one
    shape and dtype, grad (and relu_output) dense channels_last, target and x channels_last or
    slices of such along channels."""
    same = target.shape == x.shape and _kernel_pixels(x) and _kernel_pixels(target, x.dtype)
    dense = relu_output is None or _dense_like(relu_output, target)
    return same and dense and _dense_like(grad, target)


def norm_input_gradient(
    target: Tensor,
    grad: Tensor,
    x: Tensor,
    scale_grad: Tensor,
    scale_x: Tensor,
    shift: Tensor,
    accumulate: bool,
    relu_output: Tensor | None = None,
    relu_norm: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``scale_grad * grad + scale_x * x + shift`` with float32 per-channel factors (shape
    ``[C]``), computed in float (and rounded once in bf16), added to ``target`` if
    ``accumulate`` else written to it (``target`` may be ``grad``), for tensors that
    :func:`supports_norm_input_gradient`; returns target. With ``relu_output`` (``z =
    relu(norm(x))``), ``grad`` is z's gradient and goes through the ReLU's backward first, as in
    ``threshold_backward(grad, z, 0)``; with ``relu_norm`` instead, the (scale, shift) that
    :func:`norm_relu` took, z is recomputed from x as norm_relu computes it, not read."""
    library = _checked(supports_norm_input_gradient(target, grad, x, relu_output))
    n, channels, height, width = target.shape
    factors = [f.float().contiguous() for f in (scale_grad, scale_x, shift)]
    relu_factors = _relu_factors(relu_norm)
    rows = n * height * width
    getattr(library, f"norm_input_gradient_{KERNEL_DTYPES[x.dtype]}")(
        _at(target),
        ctypes.c_int64(target.stride(3)),
        _at(grad),
        _optional_at(relu_output),
        *(_optional_at(f) for f in relu_factors),
        _at(x),
        ctypes.c_int64(x.stride(3)),
        *(ctypes.c_int64(v) for v in (rows, channels)),
        *(_at(f) for f in factors),
        ctypes.c_int(accumulate),
        _threads(rows * channels),
    )
    return target


def norm_sums(grad: Tensor, x: Tensor, mean: Tensor, relu_output: Tensor | None = None) -> Tensor:
    """Batch norm's backward sums per channel, ``[sum(grad), sum(grad * (x - mean))]`` (shape
    ``[2, C]``, float32, summed in float), for tensors that :func:`supports_norm_input_gradient`
    (x as its target). With ``relu_output``, grad is taken through the ReLU's backward first, as
    in :func:`norm_input_gradient`. The same result every time for a given thread count."""
    return _norm_sums(grad, x, mean, relu_output, None)


def norm_relu_sums(
    grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None
) -> Tensor:
    """:func:`norm_sums` through the ReLU whose output is ``z = relu(x * scale + shift)``, z
    computed as :func:`norm_relu` computes it (and written to ``out`` if given) in the same pass:
    x is read once for both. For tensors that :func:`supports_norm_input_gradient` (x as its
    target, out as relu_output)."""
    return _norm_sums(grad, x, mean, out, (scale, shift))


def _norm_sums(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    relu_output: Tensor | None,
    relu_norm: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """norm_sums; with relu_norm, z computed from x and written to relu_output (norm_relu_sums)."""
    library = _checked(supports_norm_input_gradient(x, grad, x, relu_output))
    n, channels, height, width = x.shape
    rows = n * height * width
    threads = _threads(rows * channels)
    mean = mean.float().contiguous()  # held: the C call reads it
    relu_factors = _relu_factors(relu_norm)
    partial = torch.empty(threads.value, 2, channels)
    sums = torch.empty(2, channels)
    read, written = (None, relu_output) if relu_norm is not None else (relu_output, None)
    getattr(library, f"norm_sums_{KERNEL_DTYPES[x.dtype]}")(
        _at(grad),
        _optional_at(read),
        *(_optional_at(f) for f in relu_factors),
        _optional_at(written),
        _at(x),
        ctypes.c_int64(x.stride(3)),
        *(ctypes.c_int64(v) for v in (rows, channels)),
        _at(mean),
        _at(partial),
        _at(sums),
        threads,
    )
    return sums


def _relu_factors(relu_norm: tuple[Tensor, Tensor] | None) -> list[Tensor | None]:
    """A ReLU's BN factors (scale, shift) as the C kernels read them, or none; held by the
    caller until the C call returns."""
    if relu_norm is None:
        return [None, None]
    return [f.float().contiguous() for f in relu_norm]


def _optional_at(tensor: Tensor | None) -> ctypes.c_void_p | None:
    return None if tensor is None else _at(tensor)


def supports_norm_stats(x: Tensor) -> bool:
    """Whether :func:`norm_stats` takes ``x``: a CPU bf16 or float32 channels_last 4-D tensor, or
    a slice of one along channels."""
    return _kernel_pixels(x)


def norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch norm's training statistics of ``x``: the mean and biased variance of each channel
    (float32), in two passes (the variance about the mean), summed in float over blocks of pixels
    and in double over the blocks, for an ``x`` that :func:`supports_norm_stats`. The same result
    every time for a given thread count."""
    library = _checked(supports_norm_stats(x))
    n, channels, height, width = x.shape
    rows = n * height * width
    threads = _threads(rows * channels)
    partial = torch.empty(threads.value, channels, dtype=torch.float64)
    sums = torch.empty(channels, dtype=torch.float64)
    mean, var = torch.empty(channels), torch.empty(channels)
    getattr(library, f"norm_stats_{KERNEL_DTYPES[x.dtype]}")(
        _at(x),
        ctypes.c_int64(x.stride(3)),
        *(ctypes.c_int64(v) for v in (rows, channels)),
        *(_at(t) for t in (partial, sums, mean, var)),
        threads,
    )
    return mean, var


def clamp_channels(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``torch.clamp(x, low, high)`` with float32 per-channel bounds ``low``, ``high`` (shape
    ``[C]``), for an ``x`` that :func:`supports_clamp`; a dense channels_last result."""
    library = _checked(supports_clamp(x))
    n, channels, height, width = x.shape
    out = _channels_last(x, n, channels, height, width)
    rows = n * height * width
    library.clamp_bf16(
        _at(x),
        ctypes.c_int64(x.stride(3)),
        _at(out),
        *(ctypes.c_int64(v) for v in (rows, channels)),
        _at(low),
        _at(high),
        _threads(rows * channels),
    )
    return out


def clamp_avg_pool2(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``F.avg_pool2d(torch.clamp(x, low, high), 2)`` in one pass, bounds as for
    :func:`clamp_channels`."""
    library = _checked(supports_clamp(x))
    n, channels, height, width = x.shape
    out = _channels_last(x, n, channels, height // 2, width // 2)
    library.clamp_avg_pool2_bf16(
        _at(x),
        ctypes.c_int64(x.stride(3)),
        _at(out),
        *(ctypes.c_int64(v) for v in (n, height, width, channels)),
        _at(low),
        _at(high),
        _threads(out.numel() * 4),
    )
    return out


def layer_kernels_available(dtype: torch.dtype) -> bool:
    """Whether :func:`clamp_conv1x1` and :func:`conv3x3` run here in ``dtype``: bf16 where
    the library was built for a CPU with AVX512_BF16 (on AMX's tiles where it was built for AMX
    and Linux let this process use the tile registers), float32 where it was built for a CPU with
    AVX-512 or AVX2 (with FMA)."""
    return _layer_kernels(dtype) is not None


def layer_kernels_kind(dtype: torch.dtype) -> str | None:
    """Which layer kernels run here in ``dtype`` (an entry of ``LAYER_KERNELS``), None where none
    do. :func:`pack_weights` lays weights out for one kind: a network built where another kind ran
    (and unpickled here) must not hand them to these."""
    kernels = _layer_kernels(dtype)
    return None if kernels is None else kernels[1]


def supports_layer(x: Tensor) -> bool:
    """Whether :func:`clamp_conv1x1` takes ``x``: a CPU bf16 or float32 channels_last 4-D
    tensor, or a slice of one along channels, needing no gradient, with at most
    ``LAYER_MAX_CHANNELS`` channels, where :func:`layer_kernels_available` for its dtype."""
    return (
        layer_kernels_available(x.dtype)
        and _plain_cpu_4d(x)
        and _evenly_spaced_pixels(x)
        and x.shape[1] <= LAYER_MAX_CHANNELS
    )


def pack_weights(weight: Tensor) -> Tensor:
    """A 1x1 or 3x3 convolution's weights (``[out, in, k, k]``, bf16 or float32) in the layout
    :func:`clamp_conv1x1` and :func:`conv3x3` read in that dtype, here (see
    :func:`layer_kernels_kind`); a 3x3 convolution's input channels padded to those of
    :func:`bordered_buffer`."""
    library, kind = _checked_layer_kernels(weight.dtype)
    n_out, channels, kernel, _ = weight.shape
    dense = weight.detach().permute(0, 2, 3, 1)  # [out, taps, in]: tap by tap, as the kernels run
    if kernel > 1:
        padding = _bordered_channels(channels, weight.dtype) - channels
        dense = torch.nn.functional.pad(dense, (0, padding))
    dense = dense.reshape(n_out, -1)
    if weight.dtype == torch.float32:  # panels of 16 outputs: [outputs / 16][inputs][16]
        padded = torch.nn.functional.pad(dense.t(), (0, -n_out % 16))
        return padded.view(dense.shape[1], -1, 16).transpose(0, 1).contiguous()
    if kind == "amx":
        size = _round_up_32(n_out) * _round_up_32(dense.shape[1])
    else:  # input channels in pairs, outputs in panels of 16
        dense = torch.nn.functional.pad(dense, (0, dense.shape[1] % 2))
        size = (n_out + 15) // 16 * 16 * dense.shape[1]
    dense, packed = dense.contiguous(), torch.empty(size, dtype=torch.bfloat16)
    getattr(library, f"pack_weights_{kind}")(
        _at(dense), ctypes.c_int64(n_out), ctypes.c_int64(dense.shape[1]), _at(packed)
    )
    return packed


def clamp_conv1x1(
    x: Tensor,
    low: Tensor,
    high: Tensor,
    packed: Tensor,
    bias: Tensor,
    out_channels: int,
    *,
    relu: bool = True,
    avg_pool2: bool = False,
    bordered: Tensor | None = None,
) -> Tensor:
    """``conv1x1(torch.clamp(x, low, high)) + bias``, then ReLU if ``relu``, in one pass summed in
    float32 (in bf16, rounded once); with ``avg_pool2`` the convolution reads
    ``avg_pool2d(clamp(x), 2)`` (rounded to bf16 in bf16, as that op's output is). Float32 bounds
    as for :func:`clamp_channels`, weights from :func:`pack_weights`, a float32 ``bias``. Returns a
    dense channels_last result, or writes it inside ``bordered`` (from :func:`bordered_buffer`,
    for :func:`conv3x3`) and returns that."""
    assert supports_layer(x), "check supports_layer(x) first"
    n, channels, height, width = x.shape
    out_height, out_width = (height // 2, width // 2) if avg_pool2 else (height, width)
    if bordered is None:
        out = _channels_last(x, n, out_channels, out_height, out_width)
        out_stride, border = out_channels, 0
    else:
        assert bordered.shape == _bordered_shape(n, out_channels, out_height, out_width, x.dtype)
        assert bordered.dtype == x.dtype
        out, out_stride, border = bordered, bordered.shape[1], 1
    _layer_kernel(x.dtype, "clamp_conv1x1")(
        _at(x),
        *(ctypes.c_int64(v) for v in (x.stride(3), n, height, width, channels)),
        _at(low),
        _at(high),
        _at(packed),
        _at(bias),
        ctypes.c_int64(out_channels),
        _at(out),
        *(ctypes.c_int64(v) for v in (out_stride, border, avg_pool2, relu)),
        *_NO_PREFETCH,
        _threads(x.numel() * out_channels, PARALLEL_MIN_MULTIPLY_ADDS),
    )
    return out


def bordered_buffer(n: int, channels: int, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Zeros to hold :func:`conv3x3`'s input: ``n`` images of ``height`` x ``width`` pixels inside
    a border of one pixel, ``channels`` each (in bf16 rounded up to 32 on AMX, else to an even
    number), and the spare pixels the kernels' last tiles read past the end."""
    return torch.zeros(_bordered_shape(n, channels, height, width, dtype), dtype=dtype)


def _bordered_shape(
    n: int, channels: int, height: int, width: int, dtype: torch.dtype
) -> tuple[int, int]:
    pixels = n * (height + 2) * (width + 2) + BORDERED_SPARE_PIXELS
    return pixels, _bordered_channels(channels, dtype)


def _bordered_channels(channels: int, dtype: torch.dtype) -> int:
    """On AMX the channels of a 3x3 convolution's input fill whole tiles, 32 wide; vdpbf16ps
    takes them in pairs."""
    kind = _checked_layer_kernels(dtype)[1]
    return {"amx": _round_up_32(channels), "dpbf16": channels + channels % 2}.get(kind, channels)


def norm_relu_bordered(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x * scale + shift)`` with float32 per-channel factors (shape ``[C]``), computed in
    float and rounded once, as :func:`norm_relu`, written inside a new zero-bordered buffer for
    :func:`conv3x3`, laid out as :func:`bordered_buffer`'s: a plain (BN-ReLU-Conv3x3) dense layer's
    input, its border the convolution's padding. ``x`` a bf16 :func:`supports_layer` tensor."""
    assert supports_layer(x) and x.dtype == torch.bfloat16, "check supports_layer(x) first"
    n, channels, height, width = x.shape
    bordered = torch.empty(_bordered_shape(n, channels, height, width, x.dtype), dtype=x.dtype)
    _checked_layer_kernels(x.dtype)[0].norm_relu_bordered_bf16(
        _at(x),
        *(ctypes.c_int64(v) for v in (x.stride(3), n, height, width, channels)),
        _at(scale),
        _at(shift),
        _at(bordered),
        *(ctypes.c_int64(v) for v in (bordered.shape[1], BORDERED_SPARE_PIXELS)),
        _threads(bordered.numel()),
    )
    return bordered


def conv3x3(bordered: Tensor, packed: Tensor, out: Tensor) -> Tensor:
    """``out[:] = conv2d(x, weight, padding=1)``, summed in float32 (in bf16, rounded once), for
    ``x`` held inside ``bordered`` (see :func:`clamp_conv1x1`) and weights from
    :func:`pack_weights`; ``out`` a :func:`supports_layer` tensor, e.g. a block tensor's slice."""
    assert supports_layer(out) and bordered.dtype == out.dtype, "check supports_layer() first"
    n, out_channels, height, width = out.shape
    assert bordered.shape[0] == _bordered_shape(n, 1, height, width, out.dtype)[0]
    _layer_kernel(out.dtype, "conv3x3")(
        _at(bordered),
        *(ctypes.c_int64(v) for v in (n, height, width, bordered.shape[1])),
        _at(packed),
        ctypes.c_int64(out_channels),
        _at(out),
        ctypes.c_int64(out.stride(3)),
        *_NO_PREFETCH,
        _threads(bordered.numel() * 9 * out_channels, PARALLEL_MIN_MULTIPLY_ADDS),
    )
    return out


@dataclass(frozen=True)
class LayerWeights:
    """A bottleneck layer's weights for :func:`dense_block`: its clamp bounds and 1x1
    convolution's bias in float32, and both convolutions' weights from :func:`pack_weights`."""

    low: Tensor
    high: Tensor
    packed_1x1: Tensor
    bias: Tensor
    packed_3x3: Tensor


def dense_block_pointers(layers: list[LayerWeights]) -> tuple[ctypes.Array, ...]:
    """The layers' weights as the arrays of addresses :func:`dense_block` takes, valid while the
    tensors live."""
    fields = ("low", "high", "packed_1x1", "bias", "packed_3x3")
    return tuple(
        (ctypes.c_void_p * len(layers))(*(getattr(layer, field).data_ptr() for layer in layers))
        for field in fields
    )


def dense_block(
    block: Tensor,
    in_channels: int,
    growth: int,
    bottleneck: int,
    pointers: tuple[ctypes.Array, ...],
    layers: int,
    bordered: Tensor,
) -> None:
    """The first ``layers`` bottleneck layers of a dense block, in place, in one call: layer
    ``l`` reads ``block``'s first ``in_channels + l * growth`` channels and writes the next
    ``growth``, as :func:`clamp_conv1x1` (``bottleneck`` channels, inside ``bordered``) then
    :func:`conv3x3` would; weights from :func:`dense_block_pointers`."""
    dense = _plain_cpu_4d(block) and block.is_contiguous(memory_format=torch.channels_last)
    assert dense and layer_kernels_available(block.dtype), "check supports_layer() first"
    n, channels, height, width = block.shape
    assert in_channels + layers * growth <= channels and layers <= len(pointers[0])
    assert in_channels + (layers - 1) * growth <= LAYER_MAX_CHANNELS
    assert bordered.dtype == block.dtype
    assert bordered.shape == _bordered_shape(n, bottleneck, height, width, block.dtype)
    low, high, packed_1x1, bias, packed_3x3 = pointers
    _layer_kernel(block.dtype, "dense_block")(
        _at(block),
        *(ctypes.c_int64(v) for v in (n, height, width, channels, in_channels, growth, layers)),
        low,
        high,
        packed_1x1,
        bias,
        ctypes.c_int64(bottleneck),
        packed_3x3,
        _at(bordered),
        _threads(n * height * width * in_channels * bottleneck, PARALLEL_MIN_MULTIPLY_ADDS),
    )


def _round_up_32(value: int) -> int:
    return (value + 31) // 32 * 32


@functools.cache
def _layer_kernels(dtype: torch.dtype) -> tuple[ctypes.CDLL, str] | None:
    """The library and the kind of layer kernels (see LAYER_KERNELS) that run here in ``dtype``."""
    library = _library()
    for kind in LAYER_KERNELS.get(dtype, ()):
        if library is None or not hasattr(library, f"conv3x3_{kind}"):
            continue  # built for a CPU without the instructions
        if kind == "amx":
            library.amx_request.restype = ctypes.c_int
            if library.amx_request() != 0:  # a Linux without tile support, or one that refuses
                continue
        for name in ("clamp_conv1x1", "conv3x3", "dense_block", "pack_weights"):
            if hasattr(library, f"{name}_{kind}"):
                getattr(library, f"{name}_{kind}").restype = None
        if dtype == torch.bfloat16:
            library.norm_relu_bordered_bf16.restype = None
        return library, kind
    return None


def _checked_layer_kernels(dtype: torch.dtype) -> tuple[ctypes.CDLL, str]:
    kernels = _layer_kernels(dtype)
    assert kernels is not None, "check layer_kernels_available() first"
    return kernels


def _layer_kernel(dtype: torch.dtype, name: str) -> Callable[..., None]:
    library, kind = _checked_layer_kernels(dtype)
    return getattr(library, f"{name}_{kind}")


def max_pool_3x3s2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, stride=2, padding=1)`` for an ``x`` that :func:`supports_max_pool`."""
    library = _checked(supports_max_pool(x))
    kernel = getattr(library, f"max_pool_3x3s2_{KERNEL_DTYPES[x.dtype]}")
    n, channels, height, width = x.shape
    out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    out = _channels_last(x, n, channels, out_height, out_width)
    kernel(
        _at(x),
        _at(out),
        *(ctypes.c_int64(v) for v in (n, height, width, channels)),
        _threads(out.numel() * 9),
    )
    return out


def _plain_cpu_4d(x: Tensor) -> bool:
    no_grad_needed = not (torch.is_grad_enabled() and x.requires_grad)
    return x.device.type == "cpu" and x.dim() == 4 and no_grad_needed


def _kernel_pixels(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """A CPU channels_last 4-D tensor of ``dtype`` (or of any in KERNEL_DTYPES), or a slice of one
    along channels, needing no grad."""
    right_dtype = x.dtype == dtype if dtype is not None else x.dtype in KERNEL_DTYPES
    return right_dtype and _plain_cpu_4d(x) and _evenly_spaced_pixels(x)


def _dense_like(t: Tensor, like: Tensor) -> bool:
    """A dense channels_last :func:`_kernel_pixels` tensor of ``like``'s shape and dtype."""
    dense = t.is_contiguous(memory_format=torch.channels_last)
    return dense and _kernel_pixels(t, like.dtype) and t.shape == like.shape


def _evenly_spaced_pixels(x: Tensor) -> bool:
    n_stride, c_stride, h_stride, w_stride = x.stride()
    _, _, height, width = x.shape
    return c_stride == 1 and h_stride == w_stride * width and n_stride == h_stride * height


def _checked(supported: bool) -> ctypes.CDLL:
    library = _library()
    assert library is not None and supported, "check available() and supports_*(x) first"
    return library


def _channels_last(x: Tensor, n: int, channels: int, height: int, width: int) -> Tensor:
    return torch.empty(
        (n, channels, height, width), dtype=x.dtype, memory_format=torch.channels_last
    )


def _at(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _threads(work: int, per_thread: int | None = None) -> ctypes.c_int:
    """The OpenMP threads for a pass over ``work`` elements (or for ``work`` of another kind, at
    least ``per_thread`` of it each): torch's thread count, or fewer where splitting would cost
    more than it saves."""
    minimum = PARALLEL_MIN_ELEMENTS if per_thread is None else per_thread
    return ctypes.c_int(max(1, min(torch.get_num_threads(), work // minimum)))


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        path = _build()
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a cached build that no longer loads (damaged, say): build it afresh
            path.unlink(missing_ok=True)
            library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        fix = (
            "Unset $DENSENET_KERNEL_MARCH or set it to a CPU level the compiler knows "
            "(e.g. x86-64-v3)"
            if isinstance(error, subprocess.CalledProcessError)
            and "DENSENET_KERNEL_MARCH" in os.environ
            else "Install a C compiler (gcc or clang)"
        )
        warnings.warn(
            f"densenet: could not build its C kernels ({_reason(error)}); it uses PyTorch's "
            "operations instead, more slowly (and memory-efficient bf16 training with more "
            f"memory). {fix} to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name in (
        "clamp_bf16",
        "clamp_avg_pool2_bf16",
        *(f"max_pool_3x3s2_{t}" for t in KERNEL_DTYPES.values()),
        *(
            f"{kind}_{t}"
            for kind in ("norm_relu", "norm_input_gradient", "norm_sums", "norm_stats")
            for t in KERNEL_DTYPES.values()
        ),
    ):
        getattr(library, name).restype = None
    return library


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise FileNotFoundError("no C compiler found (cc, gcc or $CC)")
    source = SOURCE.read_bytes()
    cpu = cpu_info()
    flags = _flags()
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join(flags + OPENMP_FLAGS).encode(), compiler.encode()]
            + [cpu.get(field, "").encode() for field in ("model name", "flags")]
        )
    ).hexdigest()[:16]
    directory = cache_dir() / "kernels"
    path = directory / f"kernels-{key}.so"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    # Compiled under a name of this process's own and renamed: a concurrent build or a killed one
    # never leaves a half-written library under the final name.
    partial = directory / f".kernels-{key}.{os.getpid()}.so"
    try:
        try:
            _compile(compiler, flags + OPENMP_FLAGS, partial)
        except subprocess.CalledProcessError:
            _compile(compiler, flags, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _flags() -> tuple[str, ...]:
    # $DENSENET_KERNEL_MARCH builds for another CPU than this one: `make test-kernels` builds for
    # AVX2 and for SSE4.2, to test the code those CPUs would run.
    march = os.environ.get("DENSENET_KERNEL_MARCH", "native")
    return ("-O3", f"-march={march}", "-shared", "-fPIC")


def _compile(compiler: str, flags: tuple[str, ...], output: Path) -> None:
    subprocess.run(
        [*shlex.split(compiler), *flags, "-o", str(output), str(SOURCE)],
        check=True,
        capture_output=True,
        timeout=COMPILE_TIMEOUT_S,
    )


def _reason(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"the compiler failed: {lines[0] if lines else f'exit code {error.returncode}'}"
    if isinstance(error, subprocess.TimeoutExpired):
        return f"the compiler took over {COMPILE_TIMEOUT_S} s"
    return str(error)
