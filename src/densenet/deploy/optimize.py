"""An inference-only DenseNet built from a trained one by exact rewrites.

Eval-mode DenseNet spends most of its time on memory-bound work, not convolutions: every layer
applies its own BN-ReLU to the whole concatenation of earlier feature maps, and torchvision
re-concatenates those maps for every layer. The rewrites below compute the same function with one
elementwise pass per layer and no repeated concatenation:

- BN followed by ReLU, ``relu(s*x + b)``, equals ``s*clamp(x, lo, hi) + b'`` with per-channel
  bounds (``lo = -b/s`` where ``s > 0``, ``hi = -b/s`` where ``s < 0``). The clamp is one pass; the
  affine part folds exactly into the 1x1 convolution (or classifier) that follows, since those have
  no padding. Plain (non-bottleneck) layers feed a padded 3x3 convolution, where the affine part
  does not fold exactly at the borders, so they apply BN-ReLU directly.
- The BN after each bottleneck 1x1 convolution folds into that convolution's weights and bias.
- In transitions, 2x2 average pooling and the (now affine-carrying) 1x1 convolution are both linear
  and per-pixel/per-channel, so they commute: pooling first costs 4x fewer MACs.
- In the ImageNet stem, BN folds into the 7x7 convolution.
- Each dense block allocates its output once; every layer reads the channels written so far as a
  view and writes its ``growth_rate`` new channels into place.
- Everything runs channels_last, in float32 or bfloat16.

On CPU every convolution then runs through oneDNN with its weights reordered once per input shape
into the blocked layout its kernels read, and with the ReLU that follows it fused into the same
call (``conv_backend="onednn"``, chosen by default where it is supported). ``F.conv2d`` instead
reorders the weights on every call and, at batch 1, sends small 3x3 convolutions to PyTorch's slow
native kernels (torch.compile of this network, which does its own oneDNN lowering, was slower at
batch 1 and 32 on a 2-core AVX2 CPU). Where :mod:`densenet.native`'s C kernels build for a CPU with
AVX-512 or AVX2 (float32) or AVX512_BF16 (bf16, on AMX's tiles where it has them), they take over
the dense layers' and transitions' convolutions from oneDNN, each fused with the clamp before it,
and run a whole block in one call (:class:`NativeDenseBlock`). ``conv_backend="aten"`` keeps plain
``nn.Conv2d`` modules, which export to ONNX/TorchScript and move between devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet import native
from densenet.errors import ConfigError
from densenet.hardware import DTYPES, Precision
from densenet.models.densenet import DenseBlock, DenseLayer, DenseNet, DenseNetConfig, Transition

# On CPU each dense block runs (with the transition after it) on as many images at a time as keep
# its block tensor within this size, so that what a layer's clamp writes is still in the caches
# when its convolution reads it, rather than the whole batch's, tens of MB, going out to memory
# and back. DenseNet-121 at batch 32 (chunks of 5, 10, 20 and 32 images in bf16) on a 2-vCPU Xeon
# with AMX, whole batch against chunks in alternating calls: bf16 1.17x faster (median over 21
# rounds), fp32 1.21x (11 rounds, 1.15-1.32x); chunks twice as large measured the same.
CHUNK_BYTES = 8 << 20
# The precisions the rewritten network is built in (see optimize_for_inference).
INFERENCE_PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
SUPPORTED_DTYPES = tuple(DTYPES[precision] for precision in INFERENCE_PRECISIONS)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``scale * x + shift``, in float64 so folding adds no rounding of its own."""
    var = bn.running_var.double()
    scale = bn.weight.double() / torch.sqrt(var + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


class ClampedReLU(nn.Module):
    """The ``clamp(x, lo, hi)`` part of ``relu(s*x + b) = s*clamp(x, lo, hi) + b'``.

    ``scale`` and ``shift`` (``s`` and ``b'``) are returned by :meth:`from_bn` for the consumer to
    fold into its weights.
    """

    def __init__(self, low: Tensor, high: Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.view(1, -1, 1, 1))
        self.register_buffer("high", high.view(1, -1, 1, 1))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> tuple[ClampedReLU, Tensor, Tensor]:
        scale, shift = _bn_scale_shift(bn)
        threshold = -shift / scale
        # A channel with zero scale (or one so small that -b/s overflows) is the constant relu(b).
        constant = ~torch.isfinite(threshold.float())
        inf = torch.full_like(threshold, float("inf"))
        low = torch.where(scale > 0, threshold, -inf)
        high = torch.where(scale < 0, threshold, inf)
        low, high = low.masked_fill(constant, 0.0), high.masked_fill(constant, 0.0)
        scale = scale.masked_fill(constant, 0.0)
        shift = torch.where(constant, shift.clamp_min(0.0), shift)
        return cls(low, high), scale, shift

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.low, self.high)


class NativeClampedReLU(nn.Module):
    """:class:`ClampedReLU` in bf16 through :mod:`densenet.native`'s C kernel, followed
    by 2x2 average pooling in the same pass if ``avg_pool2``; ATen for inputs the kernel doesn't
    take."""

    def __init__(self, unit: ClampedReLU, avg_pool2: bool = False) -> None:
        super().__init__()
        self.register_buffer("low", unit.low)
        self.register_buffer("high", unit.high)
        # The kernel's float32 copies: plain attributes, so that no .to() can change their dtype.
        self.low32 = unit.low.float().flatten().contiguous()
        self.high32 = unit.high.float().flatten().contiguous()
        self.avg_pool2 = avg_pool2

    def forward(self, x: Tensor) -> Tensor:
        if native.supports_clamp(x):
            kernel = native.clamp_avg_pool2 if self.avg_pool2 else native.clamp_channels
            return kernel(x, self.low32, self.high32)
        out = torch.clamp(x, self.low, self.high)
        return F.avg_pool2d(out, 2) if self.avg_pool2 else out


class NativeClampConv1x1(nn.Module):
    """A clamp (with 2x2 average pooling after it in a transition) and the 1x1 convolution that
    reads it, as one pass through :mod:`densenet.native` (bf16 on AMX or AVX512_BF16, float32 on
    AVX-512 or AVX2) that never writes the clamped input to memory; ``unfused`` (the clamp, and
    pooling) and ``conv`` for inputs the kernel doesn't take."""

    def __init__(
        self,
        unfused: nn.Module,
        conv: OneDNNConv2dReLU,
        clamp: ClampedReLU,
        avg_pool2: bool = False,
    ) -> None:
        super().__init__()
        self.unfused, self.conv, self.avg_pool2 = unfused, conv, avg_pool2
        # Plain attributes, as NativeClampedReLU's bounds: no .to() can change their dtype.
        self.low32 = clamp.low.float().flatten().contiguous()
        self.high32 = clamp.high.float().flatten().contiguous()
        self.packed = native.pack_weights(conv.weight)
        self.kernels = native.layer_kernels_kind(conv.weight.dtype)  # the layout of `packed`
        self.bias32 = conv.bias.float().contiguous()
        self.out_channels = conv.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if not native.supports_layer(x) or native.layer_kernels_kind(x.dtype) != self.kernels:
            return self.conv(self.unfused(x))
        return native.clamp_conv1x1(
            x,
            self.low32,
            self.high32,
            self.packed,
            self.bias32,
            self.out_channels,
            relu=self.conv.relu,
            avg_pool2=self.avg_pool2,
        )


class NativeMaxPool3x3s2(nn.Module):
    """``nn.MaxPool2d(3, 2, padding=1)`` through :mod:`densenet.native`'s C kernel where
    it takes the input."""

    def forward(self, x: Tensor) -> Tensor:
        if native.supports_max_pool(x):
            return native.max_pool_3x3s2(x)
        return F.max_pool2d(x, 3, 2, 1)


CONV_BACKENDS = ("auto", "onednn", "aten")


class Conv2dReLU(nn.Module):
    """A convolution with given weights, optionally followed by ReLU.

    Plain ``nn.Conv2d`` and ``nn.ReLU`` modules, which quantizers and exporters recognise; the
    oneDNN backend runs the pair as one call.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        stride: int = 1,
        padding: int = 0,
        relu: bool = False,
    ) -> None:
        super().__init__()
        out_channels, in_channels, kh, kw = weight.shape
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            (kh, kw),
            stride,
            padding,
            bias=bias is not None,
            device=weight.device,
        )
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.relu: nn.Module = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))


class OneDNNConv2dReLU(nn.Module):
    """:class:`Conv2dReLU` through oneDNN, with weights reordered once per input shape.

    oneDNN picks its kernel, and with it the weight layout, from the input's shape: with weights
    reordered without the shape, DenseNet-121 at batch 1 took 27% longer (2-core AVX2 CPU). The
    reordered copies are opaque to PyTorch, so they are kept out of the
    module's state: ``state_dict``, pickling and ``copy.deepcopy`` see the plain weights.
    """

    MAX_SHAPES = 8  # distinct input shapes kept reordered; a varying input size starts afresh

    def __init__(self, unit: Conv2dReLU) -> None:
        super().__init__()
        conv = unit.conv
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = isinstance(unit.relu, nn.ReLU)
        self._reordered: dict[tuple[int, ...], Tensor] = {}

    def _weight_for(self, shape: tuple[int, ...]) -> Tensor:
        weight = self._reordered.get(shape)
        if weight is None:
            if len(self._reordered) >= self.MAX_SHAPES:
                self._reordered.clear()
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, self.dilation, self.groups, list(shape)
            )
            self._reordered[shape] = weight
        return weight

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_reordered": {}}

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self._weight_for(tuple(x.shape)),
            self.bias,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
            "relu" if self.relu else "none",
            [],
            "",
        )

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, kw = self.weight.shape
        return (
            f"{in_channels}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
            f"padding={self.padding}, relu={self.relu}"
        )


def onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``conv_backend="onednn"`` can run here: CPU, and bf16 only with native bf16 units."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _use_onednn(network: nn.Module, dtype: torch.dtype) -> None:
    """oneDNN for the convolutions; where the C kernels build, they take the stem's max pooling, in
    bf16 the clamps (a transition's with its average pooling), and on AMX or AVX512_BF16 (bf16) or
    AVX-512 or AVX2 (float32) each bottleneck layer (its clamp with its 1x1 convolution, then its
    3x3) and each transition (its clamp, pooling and convolution in one pass), and in bf16 each
    plain layer (its BN-ReLU, then its 3x3)."""
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv2dReLU):
                setattr(parent, name, OneDNNConv2dReLU(child))
    if not native.available():
        return
    bf16 = dtype == torch.bfloat16
    for module in list(network.modules()):
        if isinstance(module, ImageNetStem) and _is_3x3s2_max_pool(module.pool):
            module.pool = NativeMaxPool3x3s2()
        if not isinstance(getattr(module, "act", None), ClampedReLU):
            continue
        clamp, fused = module.act, native.layer_kernels_available(dtype)
        if isinstance(module, BottleneckLayer) and fused:
            unfused = NativeClampedReLU(clamp) if bf16 else clamp
            module.act, module.conv1 = (
                nn.Identity(),
                NativeClampConv1x1(unfused, module.conv1, clamp),
            )
        elif isinstance(module, FastTransition) and fused:
            unfused = (
                NativeClampedReLU(clamp, avg_pool2=True)
                if bf16
                else nn.Sequential(clamp, module.pool)
            )
            module.conv = NativeClampConv1x1(unfused, module.conv, clamp, avg_pool2=True)
            module.act, module.pool = nn.Identity(), nn.Identity()
        elif bf16 and isinstance(module, FastTransition):
            module.act, module.pool = NativeClampedReLU(clamp, avg_pool2=True), nn.Identity()
        elif bf16:
            module.act = NativeClampedReLU(clamp)
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FastDenseBlock) and NativeDenseBlock.takes(child):
                setattr(parent, name, NativeDenseBlock(child))
            elif (
                isinstance(child, FastDenseBlock)
                and bf16
                and native.layer_kernels_available(dtype)
                and NativePlainDenseBlock.takes(child)
            ):
                setattr(parent, name, NativePlainDenseBlock(child))


def _is_3x3s2_max_pool(pool: nn.MaxPool2d) -> bool:
    settings = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    return all(
        value in (expected, (expected, expected))
        for value, expected in zip(settings, (3, 2, 1, 1, False), strict=True)
    )


class BatchNormReLU(nn.Module):
    """Eval-mode BN followed by ReLU, as one multiply-add and an in-place ReLU."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _bn_scale_shift(bn)
        self.register_buffer("scale", scale.float().view(1, -1, 1, 1))
        self.register_buffer("shift", shift.float().view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(torch.addcmul(self.shift, x, self.scale), inplace=True)


def _input_activation(bn: nn.BatchNorm2d, fold: bool) -> tuple[nn.Module, Tensor, Tensor]:
    """The BN-ReLU in front of a 1x1 conv or linear, and the input affine left for it to fold.

    Folded: a clamp, with BN's scale and shift for the consumer's weights. Not folded: BN-ReLU
    itself, with an identity affine.
    """
    if fold:
        return ClampedReLU.from_bn(bn)
    ones = torch.ones(bn.num_features, dtype=torch.float64, device=bn.weight.device)
    return BatchNormReLU(bn), ones, torch.zeros_like(ones)


def _fold_input_affine(weight: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """A 1x1 conv (or linear) ``W`` applied to ``scale*y + shift``, as weights and bias on ``y``."""
    weight = weight.double()
    matrix = weight.flatten(1)
    bias = matrix @ shift
    return weight * scale.view(1, -1, *([1] * (weight.dim() - 2))), bias


def _fold_output_bn(
    weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """A convolution followed by ``bn``, as one convolution's weights and bias."""
    scale, shift = _bn_scale_shift(bn)
    bias = shift if bias is None else scale * bias + shift
    return weight.double() * scale.view(-1, 1, 1, 1), bias


class ImageNetStem(nn.Module):
    """Conv7x7/2 with BN folded in, ReLU, MaxPool3x3/2."""

    def __init__(self, conv0: nn.Conv2d, norm0: nn.BatchNorm2d, pool0: nn.MaxPool2d) -> None:
        super().__init__()
        weight, bias = _fold_output_bn(conv0.weight, conv0.bias, norm0)
        self.conv = Conv2dReLU(
            weight, bias, stride=conv0.stride[0], padding=conv0.padding[0], relu=True
        )
        self.pool: nn.Module = nn.MaxPool2d(
            pool0.kernel_size,
            pool0.stride,
            pool0.padding,
            pool0.dilation,
            ceil_mode=pool0.ceil_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(x))


class BottleneckLayer(nn.Module):
    """clamp -> Conv1x1 (BN1 affine and BN2 folded in) -> ReLU -> Conv3x3."""

    def __init__(self, layer: DenseLayer, fold_input_bn: bool) -> None:
        super().__init__()
        self.act, scale, shift = _input_activation(layer.norm1, fold_input_bn)
        weight, bias = _fold_input_affine(layer.conv1.weight, scale, shift)
        weight, bias = _fold_output_bn(weight, bias, layer.norm2)
        self.conv1 = Conv2dReLU(weight, bias, relu=True)
        self.conv2 = Conv2dReLU(layer.conv2.weight.detach(), None, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(self.act(x)))


class PlainLayer(nn.Module):
    """BN-ReLU -> Conv3x3. The padded 3x3 convolution can't absorb the BN affine exactly."""

    def __init__(self, layer: DenseLayer) -> None:
        super().__init__()
        self.act = BatchNormReLU(layer.norm1)
        self.conv = Conv2dReLU(layer.conv1.weight.detach(), None, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.act(x))


class FastDenseBlock(nn.Module):
    """Writes each layer's new channels into one preallocated output: no concatenation copies."""

    def __init__(self, block: DenseBlock, growth_rate: int, fold_input_bn: bool) -> None:
        super().__init__()
        layers = [module for module in block.children() if isinstance(module, DenseLayer)]
        self.in_channels = layers[0].norm1.num_features
        self.out_channels = self.in_channels + len(layers) * growth_rate
        self.growth_rate = growth_rate
        self.layers = nn.ModuleList(
            BottleneckLayer(layer, fold_input_bn) if layer.bottleneck else PlainLayer(layer)
            for layer in layers
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self._block_tensor(x)
        channels = self.in_channels
        for layer in self.layers:
            out[:, channels : channels + self.growth_rate] = layer(out[:, :channels])
            channels += self.growth_rate
        return out

    def _block_tensor(self, x: Tensor) -> Tensor:
        """The block's output, with ``x`` in its first channels."""
        n, _, h, w = x.shape
        out = torch.empty(
            (n, self.out_channels, h, w),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )
        out[:, : self.in_channels] = x
        return out


class NativeDenseBlock(FastDenseBlock):
    """A block of bottleneck layers through :mod:`densenet.native` (bf16 on AMX or AVX512_BF16,
    float32 on AVX-512 or AVX2): each layer's clamp and 1x1 convolution write inside a buffer with a
    zero border, from which its 3x3 convolution reads its padding for free and writes straight into
    the block tensor (no copy). The layers themselves (oneDNN) for inputs the kernels don't take."""

    def __init__(self, block: FastDenseBlock) -> None:
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.growth_rate, self.layers = block.growth_rate, block.layers
        self.bottleneck_channels = self.layers[0].conv1.out_channels
        # Plain attributes, as NativeClampConv1x1's: no .to() can change their dtype.
        self.weights = [
            native.LayerWeights(
                layer.conv1.low32,
                layer.conv1.high32,
                layer.conv1.packed,
                layer.conv1.bias32,
                native.pack_weights(layer.conv2.weight),
            )
            for layer in self.layers
        ]
        self.kernels = self.layers[0].conv1.kernels
        self._pointers: tuple | None = None  # the weights' addresses, for one C call per block

    @staticmethod
    def takes(block: FastDenseBlock) -> bool:
        """Whether every layer is a bottleneck whose clamp and 1x1 convolution run fused."""
        return all(
            isinstance(layer, BottleneckLayer)
            and isinstance(layer.conv1, NativeClampConv1x1)
            and layer.conv2.bias is None
            for layer in block.layers
        )

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_pointers": None}  # a copy's weights live at other addresses

    def forward(self, x: Tensor) -> Tensor:
        if not native.supports_layer(x) or native.layer_kernels_kind(x.dtype) != self.kernels:
            return super().forward(x)
        out = self._block_tensor(x)
        n, _, h, w = x.shape
        if self._pointers is None:
            self._pointers = native.dense_block_pointers(self.weights)
        fused = sum(
            self.in_channels + i * self.growth_rate <= native.LAYER_MAX_CHANNELS
            for i in range(len(self.layers))
        )
        bordered = native.bordered_buffer(n, self.bottleneck_channels, h, w, x.dtype)
        if fused:
            native.dense_block(
                out,
                self.in_channels,
                self.growth_rate,
                self.bottleneck_channels,
                self._pointers,
                fused,
                bordered,
            )
        channels = self.in_channels + fused * self.growth_rate
        for layer in self.layers[fused:]:  # inputs wider than the kernels take
            out[:, channels : channels + self.growth_rate] = layer(out[:, :channels])
            channels += self.growth_rate
        return out


class NativePlainDenseBlock(FastDenseBlock):
    """A block of plain layers (BN-ReLU -> Conv3x3, the paper's DenseNets without bottlenecks)
    in bf16 through :mod:`densenet.native`'s kernels (AMX or AVX512_BF16): each layer's BN-ReLU
    is written inside a buffer with a zero border, its padding, from which its 3x3 convolution
    writes straight into the block tensor. The layers themselves (oneDNN) for inputs the kernels
    don't take. (In float32, oneDNN's 3x3 convolution with k = 12 outputs ran twice as fast as the
    AVX-512 kernel, so float32 blocks stay with it.)"""

    def __init__(self, block: FastDenseBlock) -> None:
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.growth_rate, self.layers = block.growth_rate, block.layers
        # Plain attributes, as NativeClampConv1x1's: no .to() can change their dtype.
        self.factors = [
            (layer.act.scale.float().flatten(), layer.act.shift.float().flatten())
            for layer in self.layers
        ]
        self.packed = [native.pack_weights(layer.conv.weight) for layer in self.layers]
        self.kernels = native.layer_kernels_kind(self.packed[0].dtype)

    @staticmethod
    def takes(block: FastDenseBlock) -> bool:
        """Whether every layer is a plain layer with a bias-free convolution."""
        return all(
            isinstance(layer, PlainLayer) and layer.conv.bias is None for layer in block.layers
        )

    def forward(self, x: Tensor) -> Tensor:
        if not native.supports_layer(x) or native.layer_kernels_kind(x.dtype) != self.kernels:
            return super().forward(x)
        out = self._block_tensor(x)
        channels = self.in_channels
        for layer, (scale, shift), packed in zip(
            self.layers, self.factors, self.packed, strict=True
        ):
            inputs, new = out[:, :channels], out[:, channels : channels + self.growth_rate]
            if channels <= native.LAYER_MAX_CHANNELS:
                native.conv3x3(native.norm_relu_bordered(inputs, scale, shift), packed, new)
            else:
                new.copy_(layer(inputs))
            channels += self.growth_rate
        return out


class FastTransition(nn.Module):
    """clamp -> AvgPool2x2 -> Conv1x1 with the BN affine folded in (pool and conv commute)."""

    def __init__(self, transition: Transition, fold_input_bn: bool) -> None:
        super().__init__()
        self.act, scale, shift = _input_activation(transition.norm, fold_input_bn)
        weight, bias = _fold_input_affine(transition.conv.weight, scale, shift)
        self.conv = Conv2dReLU(weight, bias)
        self.pool: nn.Module = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(self.act(x)))


class FastHead(nn.Module):
    """Final BN-ReLU, global average pooling and classifier; the BN affine folds into the linear."""

    def __init__(self, norm: nn.BatchNorm2d, classifier: nn.Module, fold_input_bn: bool) -> None:
        super().__init__()
        self.act, scale, shift = _input_activation(norm, fold_input_bn)
        if isinstance(classifier, nn.Linear):
            weight, bias = _fold_input_affine(classifier.weight, scale, shift)
            if classifier.bias is not None:
                bias = bias + classifier.bias.double()
        elif isinstance(classifier, nn.Identity):  # the output is the pooled features themselves
            weight, bias = torch.diag(scale), shift
        else:
            raise ConfigError(
                f"optimize_for_inference folds into an nn.Linear classifier or none (nn.Identity), "
                f"not {type(classifier).__name__}; apply a custom head to the features yourself"
            )
        self.fc = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.act(x), 1), 1))


class InferenceDenseNet(nn.Module):
    """The rewritten network: same inputs and logits as the DenseNet it was built from.

    ``fold_input_bn=False`` keeps each BN-ReLU in front of its 1x1 convolution (or classifier)
    instead of folding its affine part into their weights: the same function, a little slower,
    but every convolution then reads BN-normalised input, which int8 quantization with one scale
    per tensor needs (the folded inputs span very different ranges per channel).
    """

    def __init__(
        self, model: DenseNet, dtype: torch.dtype, onednn: bool, fold_input_bn: bool = True
    ) -> None:
        super().__init__()
        self.config: DenseNetConfig = model.config
        features = model.features
        if model.config.stem == "imagenet":
            self.stem: nn.Module = ImageNetStem(features.conv0, features.norm0, features.pool0)
        else:
            self.stem = Conv2dReLU(features.conv0.weight.detach(), None, padding=1)
        stages = []
        for i in range(len(model.config.block_config)):
            block = getattr(features, f"denseblock{i + 1}")
            stages.append(FastDenseBlock(block, model.config.growth_rate, fold_input_bn))
            if hasattr(features, f"transition{i + 1}"):
                transition = getattr(features, f"transition{i + 1}")
                stages.append(FastTransition(transition, fold_input_bn))
        self.stages = nn.Sequential(*stages)
        norm = getattr(features, f"norm{len(model.config.block_config) + 1}")
        self.head = FastHead(norm, model.classifier, fold_input_bn)
        self.to(dtype=dtype, memory_format=torch.channels_last)
        if onednn:
            _use_onednn(self, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self.config.check_input(x)
        dtype = self.head.fc.weight.dtype
        out = x.to(dtype=dtype, memory_format=torch.channels_last)
        if not torch.jit.is_scripting() and _runs_eagerly_on_cpu(out):
            out = self._features_in_chunks(out)
        else:
            out = self.stages(self.stem(out))
        return self.head(out).to(x.dtype)

    @torch.jit.unused
    def _features_in_chunks(self, x: Tensor) -> Tensor:
        """``stages(stem(x))``, each dense block with what comes before it and the transition after
        it run on as many images at a time as keep its block tensor within ``CHUNK_BYTES``."""
        groups: list[list[nn.Module]] = [[self.stem]]
        for module in self.stages:
            groups[-1].append(module)
            if isinstance(module, FastTransition):
                groups.append([])
        _, _, height, width = x.shape
        pixels = height * width // (16 if self.config.stem == "imagenet" else 1)
        for i, group in enumerate(groups):
            block = next(m for m in group if isinstance(m, FastDenseBlock))
            image_bytes = block.out_channels * max(1, pixels >> (2 * i)) * x.element_size()
            chunks = [
                _run_in_turn(group, part) for part in x.split(CHUNK_BYTES // image_bytes or 1)
            ]
            x = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return x


def _runs_eagerly_on_cpu(x: Tensor) -> bool:
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return x.device.type == "cpu" and not tracing


def _run_in_turn(modules: list[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


def optimize_for_inference(
    model: DenseNet,
    *,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    conv_backend: str = "auto",
) -> nn.Module:
    """An inference-only copy of ``model`` (eval semantics) that computes the same logits faster.

    ``model`` is left untouched and the copy is built on ``model``'s device. ``dtype`` is float32
    (same results to ~1e-6) or bfloat16 (AMX on recent Xeons, tensor cores on GPUs). ``compile``
    wraps the result in ``torch.compile``, which costs tens of seconds on the first call of each
    input shape. ``conv_backend`` is "onednn" (CPU: weights reordered once, ReLU fused; the
    network then stays on the CPU), "aten" (plain ``nn.Conv2d``: exportable, any device) or
    "auto": oneDNN where it runs (CPU; bf16 only with native bf16 units) and compile is off.
    """
    if not isinstance(model, DenseNet):
        raise ConfigError(f"optimize_for_inference needs a densenet.DenseNet, got {type(model)}")
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    onednn = _wants_onednn(conv_backend, next(model.parameters()).device, dtype, compile)
    with torch.no_grad():
        network = InferenceDenseNet(model, dtype, onednn).eval()
    network.requires_grad_(False)
    return torch.compile(network) if compile else network


def _wants_onednn(
    conv_backend: str, device: torch.device, dtype: torch.dtype, compile: bool
) -> bool:
    if conv_backend not in CONV_BACKENDS:
        raise ConfigError(
            f"conv_backend must be one of {', '.join(CONV_BACKENDS)}, got {conv_backend!r}"
        )
    supported = onednn_supports(device, dtype)
    if conv_backend == "auto":
        return supported and not compile
    if conv_backend == "onednn" and not supported:
        raise ConfigError(
            f"conv_backend='onednn' runs on CPU in float32 (bfloat16 only on CPUs with native "
            f"bf16 units), not {device.type} {dtype}; use conv_backend='aten'"
        )
    if conv_backend == "onednn" and compile:
        raise ConfigError(
            "torch.compile traces plain convolutions and reorders their weights itself; "
            "use conv_backend='aten' (or 'auto') with compile=True"
        )
    return conv_backend == "onednn"
