"""Memory-efficient training of dense blocks and transitions: activation memory linear in depth.

A plain dense block keeps, for every layer, a fresh concatenation of all earlier feature maps and
the BN-ReLU output computed from it, so training memory grows quadratically with depth. Following
Pleiss et al. 2017 ("Memory-Efficient Implementation of DenseNets"), this module computes exactly
the same function in training mode with these changes:

* A whole dense block is one autograd function. Every feature map of the block is written once into
  one preallocated tensor; a layer's input is a slice of it, never a ``torch.cat`` copy. BN-ReLU
  reads that slice where it is: in one C kernel pass (:mod:`densenet.native`) on channels_last
  CPU tensors in float32 and bf16, elsewhere in float32 as one ``x * scale + shift``.
* Each BN-ReLU-Conv keeps only its input and per-channel statistics; backward recomputes the cheap
  BN-ReLU, never a convolution. What the block keeps is linear in depth: the block tensor, and for
  each bottleneck layer its 4k-channel 1x1 output (plus dropout masks when dropout is on). The
  bottleneck outputs share one allocation per block; in channels_last the 1x1 convolution writes
  its output there directly, as a matrix product.
* Tensors of 16 MiB or more that this path allocates itself (block tensors, workspace, bottleneck
  stores, the stem's and transitions' activations and gradients) come from the network's
  :class:`~densenet.models.buffer_pool.BufferPool`: the next step takes the same memory again
  instead of mapping fresh pages from the system, whose kernel zeroes each one.
* In training mode BN normalises with batch statistics, and a channel's statistics are the same in
  every later layer that reads it: they are computed once, when the channel is produced (by a C
  kernel that only reads it on channels_last CPU tensors).
* Backward accumulates the gradient of every feature map in one block-sized tensor, in place. In
  float32, and in bf16 through a C kernel (:mod:`densenet.native`) on channels_last CPU tensors,
  BN's input gradient is added to it straight from per-channel coefficients (the C kernels, in
  both dtypes, take the gradient through the ReLU's backward as they read it), and a 1x1
  convolution's input gradient is a matrix product into reused workspace: apart from the block
  tensor and its gradient, backward allocates nothing whose size changes from layer to layer, so
  the heap is not left full of holes that no later tensor fits. There, a layer's first BN-ReLU is
  recomputed by the C kernel pass that sums BN's backward, which reads x once for both (the 1x1
  convolution's input gradient, which needs only z's shape, goes first).
* A transition average-pools before its 1x1 convolution (both are linear and per-pixel, so they
  commute exactly): its convolution does a quarter of the work and nothing but its input is kept.

With torch.distributed and :class:`~densenet.models.batchnorm.SyncBatchNorm2d` layers,
statistics and BN's backward sums cover the global batch, as SyncBatchNorm's do.

Parameters, buffers and their names are untouched; running statistics are updated once per BN and
forward pass, as BN does. Evaluation uses the standard path. Forward hooks on the modules inside
a dense layer or transition do not fire on this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet import native
from densenet.errors import ConfigError
from densenet.models.batchnorm import SyncBatchNorm2d, combine_batch_stats, update_running_stats
from densenet.models.buffer_pool import BufferPool

_SAVED_PER_LAYER = 5  # dropout noise 1, bottleneck output, its mean and variance, dropout noise 2


# torch.compile runs the three entry points below eagerly (a graph break each) and compiles the
# rest of the network. Traced, each autograd function's Python loop is unrolled into one graph per
# block whose compile time grows with depth (minutes at DenseNet-BC-100), and functionalization
# would give up the preallocated buffers and in-place accumulation this path exists for.
@torch.compiler.disable
def dense_block_forward(
    layers: Sequence[nn.Module], x: Tensor, out_channels: int, buffers: BufferPool
) -> Tensor:
    """The output of a dense block (``torch.cat`` of its input and every layer's output); large
    tensors come from ``buffers``."""
    statistics = _Statistics.for_norms([norm for layer in layers for norm in _norms(layer)])
    plan = _BlockPlan(tuple(layers), out_channels, statistics, buffers)
    _check_batch(x)
    params = [p for layer in layers for p in _layer_parameters(layer)]
    return _DenseBlock.apply(plan, x, *params)


@torch.compiler.disable
def transition_forward(transition: nn.Module, x: Tensor, buffers: BufferPool) -> Tensor:
    """BN-ReLU-Conv1x1-AvgPool2x2 of a transition without dropout, as BN-ReLU-AvgPool-Conv1x1."""
    norm, conv = transition.norm, transition.conv
    statistics, stats = _training_statistics(norm, x)
    return _Transition.apply(
        statistics, buffers, stats, norm.eps, x, norm.weight, norm.bias, conv.weight
    )


@torch.compiler.disable
def stem_forward(
    norm: nn.BatchNorm2d, pool: nn.MaxPool2d, x: Tensor, buffers: BufferPool
) -> Tensor:
    """MaxPool(ReLU(BN(x))) of the ImageNet stem, keeping only x (which BN keeps anyway)."""
    statistics, stats = _training_statistics(norm, x)
    return _NormReluMaxPool.apply(
        statistics, buffers, stats, pool, norm.eps, x, norm.weight, norm.bias
    )


def _training_statistics(
    norm: nn.BatchNorm2d, x: Tensor
) -> tuple[_Statistics, tuple[Tensor, Tensor, int]]:
    """x's batch statistics for ``norm`` in training mode, its running statistics updated."""
    statistics = _Statistics.for_norms([norm])
    _check_batch(x)
    with torch.no_grad():
        stats = statistics.of(x)
        update_running_stats(norm, *stats)
    return statistics, stats


def _check_batch(x: Tensor) -> None:
    n, _, h, w = x.shape
    if n * h * w <= 1:
        # The same error BatchNorm raises: batch statistics need more than one value.
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )


def _layer_parameters(layer: nn.Module) -> list[Tensor]:
    params = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if layer.bottleneck:
        params += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return params


@dataclass(frozen=True)
class _Statistics:
    """Batch statistics and BN's backward sums over this process's batch, or the global batch."""

    synchronized: bool

    @classmethod
    def for_norms(cls, norms: Sequence[nn.Module]) -> _Statistics:
        kinds = {type(norm) for norm in norms}
        if not kinds <= {nn.BatchNorm2d, SyncBatchNorm2d} or len(kinds) != 1:
            # Batch statistics are computed here, so a BN with its own (for example frozen)
            # statistics would be silently bypassed: refuse it instead.
            names = ", ".join(sorted(kind.__name__ for kind in kinds))
            raise ConfigError(
                "memory_efficient=True needs BatchNorm2d or SyncBatchNorm2d layers, found "
                f"{names}: turn off memory_efficient (or the frozen backbone)"
            )
        if not all(norm.affine for norm in norms):
            raise ConfigError("memory_efficient=True needs BatchNorm2d layers with affine=True")
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return cls(synchronized=kinds == {SyncBatchNorm2d} and world > 1)

    def of(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel float32 mean, biased variance, and how many values each covers."""
        count = x.numel() // x.shape[1]
        if _statistics_run_natively(x):
            mean, var = native.norm_stats(x)
        else:
            # BN's own training kernel is several times faster than torch.var_mean on
            # channels_last tensors. With eps=0 its inverse standard deviation gives back the
            # variance to a few ulp.
            _, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
                x, None, None, True, 0.0, 0.0
            )
            mean, var = mean.float(), invstd.float().pow(-2)
        if not self.synchronized:
            return mean, var, count
        parts = torch.cat([mean, var, torch.tensor([float(count)], device=x.device)])
        gathered = [torch.empty_like(parts) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, parts)
        return combine_batch_stats(torch.stack(gathered), x.shape[1])

    def norm_relu(
        self, x: Tensor, eps: float, weight: Tensor, bias: Tensor, buffers: BufferPool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """relu(batch_norm(x)) in training mode (running statistics untouched), x's mean and
        variance."""
        if self.synchronized or _statistics_run_natively(x):
            mean, var, _ = self.of(x)
            out = buffers.empty_like(x)
            return _norm_relu(x, mean, var, eps, weight, bias, out), mean, var
        # One pass for the statistics and the normalisation instead of two.
        out, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
            x, weight, bias, True, 0.0, eps
        )
        return out.relu_(), mean.float(), (invstd.float().pow(-2) - eps).clamp_(min=0)

    def norm_backward(
        self,
        grad: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        weight: Tensor,
        accumulate: Tensor | None = None,
        relu_output: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of batch_norm(x) (training mode) for x, weight and bias (in weight's dtype).

        x's gradient is added to ``accumulate`` if given, else returned (possibly in grad's memory).
        With ``relu_output`` (z = relu(batch_norm(x)), where the C kernels take it), grad is z's
        and the kernels take it through the ReLU as they read it.
        """
        grad, invstd = grad.to(x.dtype), torch.rsqrt(var + eps)
        target = grad if accumulate is None else accumulate
        if relu_output is not None:
            assert _NormInputGradient.runs_natively(target, grad, x, relu_output)
            sum_grad, sum_grad_centred = native.norm_sums(grad, x, mean, relu_output)
            return self._from_kernel_sums(
                sum_grad, sum_grad_centred, weight, mean, invstd, count, grad, x, accumulate,
                relu_output=relu_output,
            )  # fmt: skip
        # float32, or bf16 where the C kernel takes it: only BN's per-channel sums, and x's
        # gradient formed from them where it is needed, without an activation-sized tensor of its
        # own. Otherwise in reduced precision: BN's own kernel, which rounds once (mixed-precision
        # arithmetic is slow on the CPU).
        natively = _NormInputGradient.runs_natively(target, grad, x)
        own_kernel = x.dtype != torch.float32 and not self.synchronized and not natively
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, eps, [own_kernel, True, True]
        )
        # BN's weight gradient is the sum of grad * x_hat, its bias gradient the sum of grad.
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        if own_kernel:
            grad_x = grad_x if accumulate is None else accumulate.add_(grad_x)
            return grad_x, grad_weight, grad_bias
        sums = torch.cat([grad_bias, grad_weight]).float()
        grad_x = self._input_gradient(sums, weight, mean, invstd, count, grad, x, accumulate)
        return grad_x, grad_weight, grad_bias

    def norm_relu_backward(
        self,
        grad: Tensor,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        weight: Tensor,
        bias: Tensor,
        accumulate: Tensor | None,
        relu_output: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients of z = relu(batch_norm(x)) (training mode) for x, weight and bias
        given z's (grad), z recomputed from x (and written into ``relu_output`` if given), for
        tensors that :meth:`_NormInputGradient.runs_natively` takes (target: ``accumulate``, or
        grad itself).

        The C kernel computes z and BN's backward sums in one read of x; x's gradient (added to
        ``accumulate`` if given, else in grad's memory) takes the ReLU from x again. z's memory
        can thus hold its own gradient, or z be written for a convolution's weight gradient
        while the gradient for z, which needs only its shape, comes first.
        """
        invstd = torch.rsqrt(var + eps)
        scale, shift = _norm_factors(mean, var, eps, weight, bias)
        sum_grad, sum_grad_centred = native.norm_relu_sums(grad, x, mean, scale, shift, relu_output)
        return self._from_kernel_sums(
            sum_grad, sum_grad_centred, weight, mean, invstd, count, grad, x, accumulate,
            relu_norm=(scale, shift),
        )  # fmt: skip

    def _from_kernel_sums(
        self,
        sum_grad: Tensor,
        sum_grad_centred: Tensor,
        weight: Tensor,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        grad: Tensor,
        x: Tensor,
        accumulate: Tensor | None,
        relu_output: Tensor | None = None,
        relu_norm: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients for x, weight and bias from the C kernels' sums of grad and of
        grad * (x - mean), grad taken through the ReLU as :meth:`_input_gradient` says."""
        sums = torch.cat([sum_grad, sum_grad_centred * invstd])
        # A copy: with synchronized statistics the sums become the global batch's below.
        grad_bias, grad_weight = sums.to(weight.dtype, copy=True).chunk(2)
        grad_x = self._input_gradient(
            sums, weight, mean, invstd, count, grad, x, accumulate, relu_output, relu_norm
        )
        return grad_x, grad_weight, grad_bias

    def _input_gradient(
        self,
        sums: Tensor,
        weight: Tensor,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        grad: Tensor,
        x: Tensor,
        accumulate: Tensor | None,
        relu_output: Tensor | None = None,
        relu_norm: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x's gradient from BN's backward sums (the bias's gradient, then the weight's), added to
        ``accumulate`` if given, else in grad's memory; grad goes through the ReLU whose output
        is ``relu_output`` or is recomputed from x with ``relu_norm`` (C kernel only)."""
        if self.synchronized:
            # x's gradient needs the sums over the global batch, as SyncBatchNorm's backward does;
            # the weight's and the bias's stay this process's, for DDP to average.
            dist.all_reduce(sums)
        input_gradient = _NormInputGradient.of(weight, mean, invstd, *sums.chunk(2), count)
        if accumulate is None:
            return input_gradient.in_place(grad, x, relu_output, relu_norm)
        return input_gradient.add_to(accumulate, grad, x, relu_output, relu_norm)


@dataclass(frozen=True)
class _NormInputGradient:
    """BN's input gradient in training mode, scale_grad * grad + scale_x * x + shift per channel."""

    scale_grad: Tensor
    scale_x: Tensor
    shift: Tensor

    @classmethod
    def of(
        cls,
        weight: Tensor,
        mean: Tensor,
        invstd: Tensor,
        sum_grad: Tensor,
        sum_grad_xhat: Tensor,
        count: int,
    ) -> _NormInputGradient:
        # d/dx of weight * (x - mean) * invstd + bias, through the batch's mean and variance:
        # weight * invstd * (grad - mean(grad) - x_hat * mean(grad * x_hat)).
        scale_grad = weight.float() * invstd
        scale_x = -scale_grad * invstd * sum_grad_xhat / count
        shift = -scale_grad * sum_grad / count - scale_x * mean
        shape = (1, -1, 1, 1)
        return cls(scale_grad.view(shape), scale_x.view(shape), shift.view(shape))

    @staticmethod
    def runs_natively(
        target: Tensor, grad: Tensor, x: Tensor, relu_output: Tensor | None = None
    ) -> bool:
        """Whether :meth:`add_to` and :meth:`in_place` run as one C kernel pass (bf16 or float32
        channels_last on the CPU), with grad taken through the ReLU whose output is
        ``relu_output`` if given."""
        supported = native.supports_norm_input_gradient(target, grad, x, relu_output)
        return supported and native.available()

    def add_to(
        self,
        target: Tensor,
        grad: Tensor,
        x: Tensor,
        relu_output: Tensor | None = None,
        relu_norm: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """target + the input gradient, in target's memory (``relu_output`` or ``relu_norm``, see
        :func:`native.norm_input_gradient`: the C kernel only)."""
        if self.runs_natively(target, grad, x, relu_output):
            factors = self._factors()
            return native.norm_input_gradient(
                target, grad, x, *factors, True, relu_output, relu_norm
            )
        assert relu_output is None and relu_norm is None, "the ReLU's backward: C kernel only"
        return target.addcmul_(grad, self.scale_grad).addcmul_(x, self.scale_x).add_(self.shift)

    def in_place(
        self,
        grad: Tensor,
        x: Tensor,
        relu_output: Tensor | None = None,
        relu_norm: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The input gradient, in grad's memory (``relu_output`` or ``relu_norm``: the C kernel
        only)."""
        if self.runs_natively(grad, grad, x, relu_output):
            factors = self._factors()
            return native.norm_input_gradient(
                grad, grad, x, *factors, False, relu_output, relu_norm
            )
        assert relu_output is None and relu_norm is None, "the ReLU's backward: C kernel only"
        return grad.mul_(self.scale_grad).addcmul_(x, self.scale_x).add_(self.shift)

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.scale_grad.view(-1), self.scale_x.view(-1), self.shift.view(-1)


@dataclass(frozen=True)
class _BlockPlan:
    layers: tuple[nn.Module, ...]
    out_channels: int
    statistics: _Statistics
    buffers: BufferPool


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _layout(x: Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _norm_relu(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor,
    out: Tensor,
) -> Tensor:
    """relu(batch_norm(x)) with given batch statistics, in ``out`` (x's shape and dtype)."""
    natively = _norm_relu_runs_natively(x, out)
    if natively or x.dtype == torch.float32:
        # With given statistics BN is x * scale + shift per channel. As one addcmul (or the C
        # kernel, which also does the ReLU) it reads a strided slice of the block tensor as fast
        # as a dense tensor; BN's kernel does not.
        scale, shift = _norm_factors(mean, var, eps, weight, bias)
        if natively:
            return native.norm_relu(x, scale, shift, out)
        shape = (1, -1, 1, 1)
        torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)
    else:
        # In reduced precision BN's kernel computes in float32 and rounds once.
        unused = torch.empty(0, device=x.device)
        torch.ops.aten.native_batch_norm.out(
            x, weight, bias, mean, var, False, 0.0, eps, out=out, save_mean=unused,
            save_invstd=unused,
        )  # fmt: skip
    return out.relu_()


def _norm_factors(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """batch_norm(x) with given statistics as x * scale + shift per channel: (scale, shift)."""
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _norm_relu_runs_natively(x: Tensor, out: Tensor) -> bool:
    """Whether :func:`_norm_relu` runs as one C kernel pass (bf16 or float32 channels_last on
    the CPU)."""
    return native.supports_norm_relu(x, out) and native.available()


def _statistics_run_natively(x: Tensor) -> bool:
    """Whether :meth:`_Statistics.of` computes x's statistics in one C kernel call (bf16 or
    float32 channels_last on the CPU): it only reads x, where BN's kernel also writes."""
    return native.supports_norm_stats(x) and native.available()


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    """F.dropout(x, p) in x's memory, and the mask it applied (the same draws as F.dropout on the
    CPU and GPU)."""
    if p == 0:
        return x, None
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x.mul_(noise), noise


def _conv(z: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """A DenseNet convolution of z: stride 1, same padding, no bias, in z's dtype; written into
    ``out`` (dense, z's layout and dtype) if given."""
    weight = weight.to(z.dtype)
    if out is not None and weight.shape[-1] == 1 and _layout(z) == torch.channels_last:
        # A matrix product over pixel rows, straight into out's memory: as fast on the CPU as the
        # convolution, without its output's copy.
        rows_out = out.permute(0, 2, 3, 1).view(-1, out.shape[1])  # a view, or an error
        torch.mm(_pixel_rows(z), weight.view(weight.shape[:2]).t(), out=rows_out)
        return out
    result = F.conv2d(z, weight, padding=weight.shape[-1] // 2)
    return result if out is None else out.copy_(result)


def _conv_backward(
    grad_out: Tensor, z: Tensor, weight: Tensor, grad_input: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_conv` for z and for the weight (in the weight's dtype).

    A 1x1 convolution is a matrix product over channels. Its z gradient goes into ``grad_input``
    (dense, z's shape, layout and dtype) when given, and the products are done by matmul: on the
    CPU that is faster than the convolution's backward, and it allocates nothing activation-sized.
    """
    if weight.shape[-1] != 1 or grad_input is None:
        grad_z, grad_weight = _convolution_backward(grad_out, z, weight, (True, True))
        return grad_z, grad_weight.to(weight.dtype)
    grad_input = _conv_input_gradient(grad_out, weight, grad_input)
    return grad_input, _conv_weight_gradient(grad_out, z, weight)


def _conv_input_gradient(grad_out: Tensor, weight: Tensor, grad_input: Tensor) -> Tensor:
    """The gradient of a 1x1 :func:`_conv` of z for z, into ``grad_input`` (dense, z's shape,
    layout and dtype): it needs only z's shape, not its values."""
    weight = weight.to(grad_input.dtype)
    grad_out = grad_out.to(grad_input.dtype)
    out_channels, in_channels = weight.shape[:2]
    matrix = weight.view(out_channels, in_channels)
    if _layout(grad_input) == torch.channels_last:
        # Rows are pixels: (N*H*W, C) matrices, views of the channels_last tensors. The weight
        # read as the transpose of a (C_in, C_out) copy: the same speed in float32 and three
        # times faster in bfloat16 on the CPU than reading it as stored.
        rows_out = grad_input.permute(0, 2, 3, 1).view(-1, in_channels)  # a view, or an error
        torch.mm(_pixel_rows(grad_out), matrix.t().contiguous().t(), out=rows_out)
    else:
        n, _, h, w = grad_input.shape
        grad_columns = grad_out.reshape(n, out_channels, h * w)
        torch.matmul(matrix.t(), grad_columns, out=grad_input.view(n, in_channels, h * w))
    return grad_input


def _conv_weight_gradient(grad_out: Tensor, z: Tensor, weight: Tensor) -> Tensor:
    """The gradient of a 1x1 :func:`_conv` of z for its weight (in the weight's dtype)."""
    grad_out = grad_out.to(z.dtype)
    if _layout(z) == torch.channels_last:
        grad_weight = torch.mm(_pixel_rows(grad_out).t(), _pixel_rows(z))
    else:
        grad_weight = _convolution_backward(grad_out, z, weight, (False, True))[1]
    return grad_weight.view_as(weight).to(weight.dtype)


def _convolution_backward(
    grad_out: Tensor, z: Tensor, weight: Tensor, wanted: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """ATen's backward of :func:`_conv`: the gradients for z and for the weight (in z's dtype)
    that ``wanted`` asks for."""
    padding = weight.shape[-1] // 2
    grad_z, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out.to(z.dtype), z, weight.to(z.dtype), None, [1, 1], [padding, padding], [1, 1],
        False, [0, 0], 1, [*wanted, False],
    )  # fmt: skip
    return grad_z, grad_weight


def _pixel_rows(x: Tensor) -> Tensor:
    """A channels_last (N, C, H, W) tensor as an (N*H*W, C) matrix (a view when x is dense)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _norm_relu_backward(
    statistics: _Statistics,
    grad_z: Tensor,
    z: Tensor | None,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    eps: float,
    norm_weight: Tensor,
    norm_bias: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of z = relu(batch_norm(x)) for x, the norm's weight and its bias, given z's;
    z recomputed from x where it is not given (tensors that :meth:`_NormInputGradient.runs_natively`
    takes only).

    z and grad_z are spent: the memory of one of them holds x's gradient.
    """
    if z is None:
        return statistics.norm_relu_backward(
            grad_z, x, mean, var, count, eps, norm_weight, norm_bias, None, None
        )
    if _NormInputGradient.runs_natively(grad_z, grad_z, x, z):
        return statistics.norm_backward(grad_z, x, mean, var, count, eps, norm_weight, None, z)
    grad_relu_input = _relu_backward(grad_z, z)
    return statistics.norm_backward(grad_relu_input, x, mean, var, count, eps, norm_weight)


def _relu_backward(grad_z: Tensor, z: Tensor) -> Tensor:
    """The gradient of z = relu(input) for its input, given z's, written into z's memory."""
    # One activation-sized tensor fewer at the peak than a new one.
    return torch.ops.aten.threshold_backward.grad_input(grad_z.to(z.dtype), z, 0, grad_input=z)


def _workspace(layers: Sequence[nn.Module], features: Tensor, buffers: BufferPool) -> Tensor:
    """Room for the widest BN input of a block's layers, freed with the forward or backward pass.

    Per-layer tensors that grow with every layer would leave holes in the heap that the next, wider
    one does not fit in: the process would keep far more memory than it uses. These are reused.
    """
    n, _, h, w = features.shape
    widest = max(norm.num_features for layer in layers for norm in _norms(layer))
    return buffers.empty((n * widest * h * w,), features.dtype, features.device)


def _bottleneck_store(
    layers: Sequence[nn.Module], x: Tensor, dtype: torch.dtype, buffers: BufferPool
) -> Tensor | None:
    """Room for every bottleneck output of a block, kept for backward: one allocation per block.

    Kept one by one, these tensors stay alive among the forward and backward passes' short-lived
    ones and pin the heap: glibc can neither reuse nor return the holes between them. One
    block-sized allocation is above glibc's mmap threshold: it comes from ``buffers`` whole.
    """
    if not layers[0].bottleneck:
        return None
    n, _, h, w = x.shape
    width = layers[0].norm2.num_features
    return buffers.empty((len(layers), n * width * h * w), dtype, x.device)


def _norms(layer: nn.Module) -> list[nn.BatchNorm2d]:
    return [layer.norm1, layer.norm2] if layer.bottleneck else [layer.norm1]


class _BlockMemory:
    """The block tensor, its per-channel statistics, and workspace for one layer's BN in and out."""

    def __init__(
        self, layers: Sequence[nn.Module], x: Tensor, out_channels: int, buffers: BufferPool
    ) -> None:
        n, _, h, w = x.shape
        self.layout = _layout(x)
        # torch.cat would promote, e.g. a float32 block input under bfloat16 autocast.
        dtype = torch.promote_types(x.dtype, _compute_dtype(x))
        self.features = buffers.empty((n, out_channels, h, w), dtype, x.device, self.layout)
        self.mean = torch.empty(out_channels, dtype=torch.float32, device=x.device)
        self.var = torch.empty_like(self.mean)
        self.inputs = _workspace(layers, self.features, buffers)
        self.outputs = _workspace(layers, self.features, buffers)
        self.bottlenecks = _bottleneck_store(layers, x, _compute_dtype(x), buffers)
        self.filled = 0

    @classmethod
    def restore(
        cls,
        layers: Sequence[nn.Module],
        features: Tensor,
        mean: Tensor,
        var: Tensor,
        buffers: BufferPool,
    ) -> _BlockMemory:
        """The memory of a block whose forward pass is done, with new workspace."""
        memory = cls.__new__(cls)
        memory.features, memory.mean, memory.var = features, mean, var
        memory.layout = _layout(features)
        memory.inputs = _workspace(layers, features, buffers)
        memory.outputs = _workspace(layers, features, buffers)
        memory.bottlenecks = None
        memory.filled = features.shape[1]
        return memory

    def bottleneck(self, index: int, channels: int) -> Tensor:
        """Room in the store for layer ``index``'s bottleneck output (its 1x1 convolution's)."""
        assert self.bottlenecks is not None, "a block of bottleneck layers has a store"
        return self._dense(self.bottlenecks[index], channels)

    def append(self, feature: Tensor, mean: Tensor, var: Tensor) -> None:
        start, end = self.filled, self.filled + feature.shape[1]
        self.features[:, start:end].copy_(feature)
        self.mean[start:end] = mean
        self.var[start:end] = var
        self.filled = end

    def norm_input(self, channels: int) -> Tensor:
        """The first ``channels`` feature maps as the input of a BN-ReLU (:func:`_norm_relu`).

        In float32, and in bf16 where the C kernel runs, that is the block tensor's (strided)
        slice itself. BN's own kernels, used otherwise, are much slower on strided tensors than
        one copy and the dense kernel.
        """
        features = self.features[:, :channels]
        if features.dtype == torch.float32 or _norm_relu_runs_natively(
            features, self.activations(channels)
        ):
            return features
        return self.dense_input(channels)

    def dense_input(self, channels: int) -> Tensor:
        """A dense copy of the first ``channels`` feature maps, in the input workspace."""
        return self._dense(self.inputs, channels).copy_(self.features[:, :channels])

    def spare(self, channels: int) -> Tensor:
        """The input workspace as a dense tensor of ``channels`` channels, its content undefined."""
        return self._dense(self.inputs, channels)

    def activations(self, channels: int) -> Tensor:
        """Workspace memory for one BN-ReLU output of ``channels`` channels."""
        return self._dense(self.outputs, channels)

    def _dense(self, workspace: Tensor, channels: int) -> Tensor:
        n, _, h, w = self.features.shape
        flat = workspace[: n * channels * h * w]
        if self.layout == torch.channels_last:
            return flat.view(n, h, w, channels).permute(0, 3, 1, 2)
        return flat.view(n, channels, h, w)


class _DenseBlock(torch.autograd.Function):
    """A whole dense block: the block tensor and linear-size per-layer state kept for backward."""

    # torch >= 2.14 hands backward its output gradient in a list it may empty: taken from it, the
    # block-sized gradient becomes the block's own (or is freed once copied); older versions pass
    # the tensor and ignore this.
    boxed_grads_call = True

    @staticmethod
    def forward(ctx, plan: _BlockPlan, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        statistics, dtype = plan.statistics, _compute_dtype(x)
        memory = _BlockMemory(plan.layers, x, plan.out_channels, plan.buffers)
        mean, var, count = statistics.of(x)  # count: values per channel, global when synchronized
        memory.append(x, mean, var)
        saved: list[Tensor | None] = []
        layers = zip(plan.layers, _per_layer(plan.layers, params), strict=True)
        for index, (layer, layer_params) in enumerate(layers):
            channels = memory.filled
            mean, var = memory.mean[:channels], memory.var[:channels]
            update_running_stats(layer.norm1, mean, var, count)
            z = _norm_relu(
                memory.norm_input(channels), mean, var, layer.norm1.eps, *layer_params[:2],
                out=memory.activations(channels),
            )  # fmt: skip
            # A bottleneck output is kept for backward: it goes straight to the block's store.
            kept = memory.bottleneck(index, layer_params[2].shape[0]) if layer.bottleneck else None
            out, noise1 = _dropout(_conv(z.to(dtype), layer_params[2], kept), layer.drop_rate)
            bottleneck = b_mean = b_var = noise2 = None
            if layer.bottleneck:
                bottleneck = out
                norm_weight, norm_bias, conv_weight = layer_params[3:]
                z, b_mean, b_var = statistics.norm_relu(
                    bottleneck, layer.norm2.eps, norm_weight, norm_bias, plan.buffers
                )
                update_running_stats(layer.norm2, b_mean, b_var, count)
                out, noise2 = _dropout(_conv(z.to(dtype), conv_weight), layer.drop_rate)
                del z
            memory.append(out, *statistics.of(out)[:2])
            saved += [noise1, bottleneck, b_mean, b_var, noise2]
        ctx.plan, ctx.dtype, ctx.count, ctx.num_params = plan, dtype, count, len(params)
        ctx.save_for_backward(memory.features, memory.mean, memory.var, *params, *saved)
        return memory.features

    @staticmethod
    @once_differentiable
    def backward(ctx, grads: list[Tensor] | Tensor) -> tuple[Tensor | None, ...]:
        plan, dtype, count, statistics = ctx.plan, ctx.dtype, ctx.count, ctx.plan.statistics
        features, mean, var, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.num_params], rest[ctx.num_params :]
        # The gradient of every feature map, accumulated in place as later layers are undone.
        grad_out = grads.pop() if isinstance(grads, list) else grads
        if plan.buffers.held_only_by(grad_out) and _same_layout(grad_out, features):
            grad = grad_out  # nothing else reads it: accumulated in place, without a copy
        else:
            grad = plan.buffers.empty_like(features).copy_(grad_out)
        del grad_out
        memory = _BlockMemory.restore(plan.layers, features, mean, var, plan.buffers)
        param_grads: list[Tensor] = []
        per_layer = list(_per_layer(plan.layers, params))
        for index in reversed(range(len(plan.layers))):
            layer = plan.layers[index]
            norm_weight, norm_bias, conv_weight, *second = per_layer[index]
            noise1, bottleneck, b_mean, b_var, noise2 = saved[
                index * _SAVED_PER_LAYER : (index + 1) * _SAVED_PER_LAYER
            ]
            channels = layer.norm1.num_features
            grad_new = grad[:, channels : channels + per_layer[index][-1].shape[0]]
            grads2: list[Tensor] = []
            if layer.bottleneck:
                # The 4k-channel tensors here have the same size in every layer of the block.
                # (Recomputing z in the pass that sums BN's backward, as for the first BN below,
                # would split the 3x3 convolution's backward in two oneDNN calls: no faster.)
                grad_new = grad_new if noise2 is None else grad_new * noise2
                z = _norm_relu(
                    bottleneck, b_mean, b_var, layer.norm2.eps, *second[:2],
                    plan.buffers.empty_like(bottleneck),
                )  # fmt: skip
                grad_z, grad_conv2 = _conv_backward(grad_new, z.to(dtype), second[2])
                grad_new, *grads2 = _norm_relu_backward(
                    statistics, grad_z, z, bottleneck, b_mean, b_var, count, layer.norm2.eps,
                    *second[:2],
                )  # fmt: skip
                grads2.append(grad_conv2)
                del z, grad_z
            grad_new = grad_new if noise1 is None else grad_new * noise1
            # A 1x1 convolution's input gradient goes into the input workspace.
            spare = memory.spare(channels) if memory.features.dtype == dtype else None
            x, z = memory.features[:, :channels], memory.activations(channels)
            accumulate = grad[:, :channels]
            into_spare = conv_weight.shape[-1] == 1 and spare is not None  # a matmul there
            if into_spare and _NormInputGradient.runs_natively(accumulate, spare, x, z):
                # z is recomputed in the pass that sums BN's backward, which reads x for both:
                # the convolution's gradient for z, which needs only z's shape, goes first.
                grad_input = _conv_input_gradient(grad_new, conv_weight, spare)
                _, *grads1 = statistics.norm_relu_backward(
                    grad_input, x, mean[:channels], var[:channels], count, layer.norm1.eps,
                    norm_weight, norm_bias, accumulate, z,
                )  # fmt: skip
                grad_conv1 = _conv_weight_gradient(grad_new, z, conv_weight)
            else:
                z = _norm_relu(
                    memory.norm_input(channels), mean[:channels], var[:channels],
                    layer.norm1.eps, norm_weight, norm_bias, out=z,
                )  # fmt: skip
                grad_input, grad_conv1 = _conv_backward(grad_new, z.to(dtype), conv_weight, spare)
                relu_output = z
                if not _NormInputGradient.runs_natively(accumulate, grad_input, x, z):
                    # BN's backward sums are many times faster over a dense x than over the
                    # strided slice. The copy overwrites the spare workspace: the ReLU's backward
                    # goes first.
                    grad_input, relu_output = _relu_backward(grad_input, z), None
                    x = memory.dense_input(channels)
                del spare
                _, *grads1 = statistics.norm_backward(
                    grad_input, x, mean[:channels], var[:channels], count, layer.norm1.eps,
                    norm_weight, accumulate, relu_output,
                )  # fmt: skip
            param_grads = [*grads1, grad_conv1, *grads2, *param_grads]
        in_channels = plan.layers[0].norm1.num_features
        return None, grad[:, :in_channels], *param_grads


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _per_layer(layers: Sequence[nn.Module], params: Sequence[Tensor]):
    """``params`` (see :func:`_layer_parameters`) cut into each layer's 3 or 6."""
    start = 0
    for layer in layers:
        size = 6 if layer.bottleneck else 3
        yield params[start : start + size]
        start += size


class _Transition(torch.autograd.Function):
    """conv1x1(avg_pool(relu(norm(x)))), keeping only x (the block tensor, which is kept anyway)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        statistics: _Statistics,
        buffers: BufferPool,
        stats: tuple[Tensor, Tensor, int],
        eps: float,
        x: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
        conv_weight: Tensor,
    ) -> Tensor:
        mean, var, count = stats
        dtype = _compute_dtype(x)
        ctx.statistics, ctx.buffers, ctx.eps, ctx.dtype = statistics, buffers, eps, dtype
        ctx.count = count
        ctx.save_for_backward(x, mean, var, norm_weight, norm_bias, conv_weight)
        z = _norm_relu(x, mean, var, eps, norm_weight, norm_bias, buffers.empty_like(x))
        return _conv(F.avg_pool2d(z.to(dtype), 2), conv_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, var, norm_weight, norm_bias, conv_weight = ctx.saved_tensors
        buffers = ctx.buffers
        z = _norm_relu(x, mean, var, ctx.eps, norm_weight, norm_bias, buffers.empty_like(x))
        conv_input = z.to(ctx.dtype)
        pooled = F.avg_pool2d(conv_input, 2)
        grad_pooled, grad_conv = _conv_backward(
            grad_out, pooled, conv_weight, buffers.empty_like(pooled)
        )
        del pooled
        # Where the ReLU can be recomputed from x, z's values are spent: its memory takes the
        # pooling's gradient (x gives the shape).
        spent = conv_input is z and _NormInputGradient.runs_natively(z, z, x)
        grad_z = torch.ops.aten.avg_pool2d_backward.grad_input(
            grad_pooled, x if spent else conv_input, [2, 2], [2, 2], [0, 0], False, True, None,
            grad_input=z if spent else buffers.empty_like(conv_input),
        )  # fmt: skip
        del grad_pooled, conv_input
        grads = _norm_relu_backward(
            ctx.statistics, grad_z, None if spent else z, x, mean, var, ctx.count, ctx.eps,
            norm_weight, norm_bias,
        )  # fmt: skip
        return None, None, None, None, *grads, grad_conv


class _NormReluMaxPool(torch.autograd.Function):
    """max_pool(relu(norm(x))), keeping x: neither the ReLU output nor the pool's indices."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        statistics: _Statistics,
        buffers: BufferPool,
        stats: tuple[Tensor, Tensor, int],
        pool: nn.MaxPool2d,
        eps: float,
        x: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
    ) -> Tensor:
        mean, var, count = stats
        ctx.statistics, ctx.buffers, ctx.pool, ctx.eps = statistics, buffers, pool, eps
        ctx.count = count
        ctx.save_for_backward(x, mean, var, norm_weight, norm_bias)
        z = _norm_relu(x, mean, var, eps, norm_weight, norm_bias, buffers.empty_like(x))
        return _max_pool(pool, z, buffers)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, var, norm_weight, norm_bias = ctx.saved_tensors
        pool, buffers = ctx.pool, ctx.buffers
        z = _norm_relu(x, mean, var, ctx.eps, norm_weight, norm_bias, buffers.empty_like(x))
        _, indices = _max_pool(pool, z, buffers)
        # As in a transition: once the indices are known, z's memory can take its gradient.
        spent = _NormInputGradient.runs_natively(z, z, x)
        grad_z = torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            grad_out, x if spent else z, *_pool_arguments(pool), indices,
            grad_input=z if spent else buffers.empty_like(z),
        )  # fmt: skip
        del indices
        grads = _norm_relu_backward(
            ctx.statistics, grad_z, None if spent else z, x, mean, var, ctx.count, ctx.eps,
            norm_weight, norm_bias,
        )  # fmt: skip
        return None, None, None, None, None, *grads


def _pool_arguments(pool: nn.MaxPool2d) -> tuple[list[int], list[int], list[int], list[int], bool]:
    return (
        *(list(torch.nn.modules.utils._pair(value)) for value in (
            pool.kernel_size, pool.stride, pool.padding, pool.dilation
        )),
        pool.ceil_mode,
    )  # fmt: skip


def _max_pool(pool: nn.MaxPool2d, z: Tensor, buffers: BufferPool) -> tuple[Tensor, Tensor]:
    """max_pool(z) and its indices, which are as large as z in bf16: from ``buffers``."""
    arguments = _pool_arguments(pool)
    like_out, like_indices = torch.ops.aten.max_pool2d_with_indices(
        torch.empty_like(z, device="meta"), *arguments
    )
    out = torch.empty_like(like_out, device=z.device)
    indices = buffers.empty(like_indices.shape, like_indices.dtype, z.device, _layout(like_indices))
    return torch.ops.aten.max_pool2d_with_indices.out(z, *arguments, out=out, indices=indices)
