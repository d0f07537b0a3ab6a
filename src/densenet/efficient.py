"""Memory-efficient training of dense blocks: activation memory linear in depth.

A plain dense block keeps, for every layer, a fresh concatenation of all earlier feature maps and
the BN-ReLU output computed from it, so training memory grows quadratically with depth. Following
Pleiss et al. 2017 ("Memory-Efficient Implementation of DenseNets"), this module computes exactly
the same function with three changes:

* every feature map of a block is written once into one preallocated tensor; a layer's input is a
  slice of it, never a copy (no quadratic ``torch.cat``);
* BN-ReLU-Conv is one autograd function that keeps only its input (that slice) and per-channel
  statistics, and recomputes the cheap BN-ReLU in backward -- never the convolution;
* in training mode BN normalises with batch statistics, and a channel's statistics are the same in
  every later layer that reads it: they are computed once, when the channel is produced.

Only training mode goes through here; evaluation uses the standard path. Parameters, buffers and
their names are untouched; running statistics are updated once per BN and forward pass, as BN does.
Forward hooks on the modules inside a dense layer do not fire on this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet.errors import ConfigError


def dense_block_forward(layers: Sequence[nn.Module], x: Tensor, out_channels: int) -> Tensor:
    """The output of a dense block (``torch.cat`` of its input and every layer's output)."""
    for layer in layers:
        for norm in (layer.norm1, getattr(layer, "norm2", None)):
            # Batch statistics are computed here, so a BN subclass with its own (synchronised or
            # frozen) statistics would be silently bypassed: refuse it instead.
            if norm is not None and type(norm) is not nn.BatchNorm2d:
                raise ConfigError(
                    f"memory_efficient=True needs plain BatchNorm2d layers, found "
                    f"{type(norm).__name__}: turn off memory_efficient (or --sync-bn / "
                    "a frozen backbone)"
                )
    n, _, h, w = x.shape
    if n * h * w <= 1:
        # The same error BatchNorm raises: batch statistics need more than one value.
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    memory = _BlockMemory.allocate(layers, x, out_channels)
    features = [x]
    memory.append(x)
    for layer in layers:
        new = _layer_forward(layer, memory, features)
        memory.append(new)
        features.append(new)
    return _Concatenated.apply(memory.features, *features)


@dataclass
class _BlockMemory:
    """The tensors one dense block shares between its layers during one training step."""

    features: Tensor  # (N, C_out, H, W): the block input, then each layer's new channels
    mean: Tensor  # (C_out,) float32 batch mean of every channel of `features`
    var: Tensor  # (C_out,) float32 biased batch variance
    scratch: Tensor  # flat; a dense copy of one layer's input at a time, forward and backward
    channels_last: bool
    filled: int = field(default=0)

    @classmethod
    def allocate(cls, layers: Sequence[nn.Module], x: Tensor, out_channels: int) -> _BlockMemory:
        n, _, h, w = x.shape
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        compute_dtype = _compute_dtype(x)
        # torch.cat would promote, e.g. a float32 block input under bfloat16 autocast.
        dtype = torch.promote_types(x.dtype, compute_dtype)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        widest = max(
            max(layer.norm1.num_features for layer in layers),
            max(layer.norm2.num_features if layer.bottleneck else 0 for layer in layers),
        )
        stats = dict(dtype=torch.float32, device=x.device)
        return cls(
            features=torch.empty(
                (n, out_channels, h, w), dtype=dtype, device=x.device, memory_format=layout
            ),
            mean=torch.empty(out_channels, **stats),
            var=torch.empty(out_channels, **stats),
            scratch=torch.empty(n * widest * h * w, dtype=dtype, device=x.device),
            channels_last=channels_last,
        )

    def append(self, feature: Tensor) -> None:
        start, end = self.filled, self.filled + feature.shape[1]
        with torch.no_grad():
            self.features[:, start:end].copy_(feature)
            var, mean = torch.var_mean(feature.float(), dim=(0, 2, 3), unbiased=False)
            self.mean[start:end] = mean
            self.var[start:end] = var
        self.filled = end

    def dense(self, x: Tensor) -> Tensor:
        """x itself if it is dense, else a dense copy of it in the scratch memory.

        A slice of the block tensor is strided, and BN kernels on strided tensors are many times
        slower than one copy followed by the dense kernel.
        """
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if x.is_contiguous(memory_format=layout):
            return x
        n, c, h, w = x.shape
        flat = self.scratch[: n * c * h * w]
        if self.channels_last:
            return flat.view(n, h, w, c).permute(0, 3, 1, 2).copy_(x)
        return flat.view(n, c, h, w).copy_(x)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _layer_forward(layer: nn.Module, memory: _BlockMemory, features: list[Tensor]) -> Tensor:
    channels = memory.filled
    x = memory.features[:, :channels]
    # Copies, because later layers fill in more statistics; these are only `channels` numbers.
    mean, var = memory.mean[:channels].clone(), memory.var[:channels].clone()
    out = _norm_relu_conv(layer.norm1, layer.conv1, x, mean, var, memory, features)
    out = layer._dropout(out)
    if layer.bottleneck:
        with torch.no_grad():
            var, mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
        out = layer._dropout(
            _norm_relu_conv(layer.norm2, layer.conv2, out, mean, var, memory, [out])
        )
    return out


def _norm_relu_conv(
    norm: nn.BatchNorm2d,
    conv: nn.Conv2d,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    memory: _BlockMemory,
    inputs: list[Tensor],
) -> Tensor:
    """conv(relu(norm(x))) in training mode, given x's batch statistics.

    ``inputs`` are the autograd tensors whose channels, concatenated, are x's data; x's gradient
    is handed back to them.
    """
    _update_running_stats(norm, mean, var, count=x.shape[0] * x.shape[2] * x.shape[3])
    return _NormReluConv.apply(
        memory, x, mean, var, norm.eps, norm.weight, norm.bias, conv.weight, conv.padding, *inputs
    )


def _update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    # What BatchNorm2d.forward does in training mode, done here exactly once per forward pass.
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    with torch.no_grad():
        norm.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        norm.running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / (count - 1))


def _normalize_relu(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """relu(batch_norm(x)) with given batch statistics: BN's own kernel, in inference mode."""
    z = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False).relu_()
    return z.to(dtype)


class _NormReluConv(torch.autograd.Function):
    """conv(relu(batch_norm(x))) keeping only x and its statistics for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        memory: _BlockMemory,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        eps: float,
        bn_weight: Tensor,
        bn_bias: Tensor,
        conv_weight: Tensor,
        padding: tuple[int, int],
        *inputs: Tensor,
    ) -> Tensor:
        dtype = _compute_dtype(x)
        z = _normalize_relu(memory.dense(x), mean, var, eps, bn_weight, bn_bias, dtype)
        # Not save_for_backward: later layers write other channels of the same block tensor, which
        # would trip autograd's version check. The channels x covers are never written again.
        ctx.x, ctx.memory, ctx.padding, ctx.eps, ctx.dtype = x, memory, list(padding), eps, dtype
        ctx.channels = [t.shape[1] for t in inputs]
        ctx.save_for_backward(mean, var, bn_weight, bn_bias, conv_weight)
        return F.conv2d(z, conv_weight.to(dtype), padding=padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        mean, var, bn_weight, bn_bias, conv_weight = ctx.saved_tensors
        x = ctx.memory.dense(ctx.x)
        z = _normalize_relu(x, mean, var, ctx.eps, bn_weight, bn_bias, ctx.dtype)
        invstd = torch.rsqrt(var + ctx.eps)
        grad_z, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_out.to(z.dtype),
            z,
            conv_weight.to(z.dtype),
            None,
            [1, 1],
            ctx.padding,
            [1, 1],
            False,
            [0, 0],
            1,
            [True, True, False],
        )
        grad_z = torch.ops.aten.threshold_backward(grad_z, z, 0).to(x.dtype)
        grad_x, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_z, x, bn_weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        return (
            None,
            None,
            None,
            None,
            None,
            grad_bn_weight.to(bn_weight.dtype),
            grad_bn_bias.to(bn_bias.dtype),
            grad_conv_weight.to(conv_weight.dtype),
            None,
            *grad_x.split(ctx.channels, dim=1),
        )


class _Concatenated(torch.autograd.Function):
    """The block tensor as the concatenation of ``features``, whose data it already holds."""

    @staticmethod
    def forward(ctx, storage: Tensor, *features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.channels = [t.shape[1] for t in features]
        return storage

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *grad.split(ctx.channels, dim=1))
