"""DenseNet (Huang et al., CVPR 2017) as described in the paper.

Module and parameter names follow torchvision's layout (``features.denseblock1.denselayer1.conv1``
and so on) so that its checkpoints load without renaming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from densenet.errors import ConfigError, brief
from densenet.models import efficient
from densenet.models.buffer_pool import BufferPool

Stem = Literal["imagenet", "cifar"]
# The ImageNet stem's layers, in order; the CIFAR stem is conv0 alone.
IMAGENET_STEM = ("conv0", "norm0", "relu0", "pool0")
# The most parameters a config may describe (1 GiB of fp32 weights): 8x DenseNet-264, the largest
# preset. Checked before anything is allocated, so a typo (growth_rate=100000000) is an error
# instead of an attempt to allocate 38 GB.
MAX_PARAMETERS = 2**28


@dataclass(frozen=True)
class EfficientParts:
    """The parts of a DenseNet that train through :mod:`densenet.models.efficient`.

    Only in training mode: evaluation always takes the standard path.
    """

    stem: bool
    blocks: bool
    transitions: bool


@dataclass(frozen=True)
class DenseNetConfig:
    """Everything that determines a DenseNet's architecture.

    ``bn_size`` = 0 gives the paper's plain layer H = BN-ReLU-Conv3x3; otherwise each layer is the
    bottleneck BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) (DenseNet-B). ``compression`` < 1 makes
    transitions shrink channels to floor(theta*m) (DenseNet-C). ``memory_efficient`` trains the
    dense blocks, transitions and ImageNet stem with activation memory linear in depth
    (:mod:`densenet.models.efficient`); the function, the parameters and evaluation stay the same.
    A config may describe at most :data:`MAX_PARAMETERS` parameters.
    """

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3
    stem: Stem = "imagenet"
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_config, (list, tuple)):
            raise ConfigError(
                f"block_config must be a list of layer counts, got {brief(self.block_config)}"
            )
        # Lists from JSON or the command line become tuples so configs stay hashable and comparable.
        object.__setattr__(self, "block_config", tuple(self.block_config))
        self.validate()

    def validate(self) -> None:
        def positive_int(name: str, value: object, allow_zero: bool = False) -> None:
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {brief(value)}")
            # The network then has more parameters than this (each of these sizes adds at least
            # as many); refused before counting them, so that the count stays a float's size.
            if value > MAX_PARAMETERS:
                raise _too_large(f"{name} {value} alone gives more parameters than")

        for name in ("compression", "drop_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {brief(value)}")

        positive_int("growth_rate", self.growth_rate)
        positive_int("num_init_features", self.num_init_features)
        positive_int("bn_size", self.bn_size, allow_zero=True)
        positive_int("num_classes", self.num_classes, allow_zero=True)
        positive_int("in_channels", self.in_channels)
        if not self.block_config:
            raise ConfigError("block_config must name at least one dense block, got ()")
        for i, layers in enumerate(self.block_config):
            positive_int(f"block_config[{i}]", layers)
        if not 0.0 < self.compression <= 1.0:
            raise ConfigError(f"compression must be in (0, 1], got {brief(self.compression)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {brief(self.drop_rate)}")
        if self.stem not in ("imagenet", "cifar"):
            raise ConfigError(f"stem must be 'imagenet' or 'cifar', got {brief(self.stem)}")
        if not isinstance(self.memory_efficient, bool):
            raise ConfigError(
                f"memory_efficient must be true or false, got {brief(self.memory_efficient)}"
            )
        if min(self.transition_channels, default=1) < 1:
            raise ConfigError(
                f"compression {self.compression} makes transitions of {self.transition_channels} "
                "channels, and each needs at least 1: raise compression"
            )
        if self.num_parameters > MAX_PARAMETERS:
            parameters = f"{self.num_parameters:,} parameters"
            raise _too_large(f"this architecture has {parameters}, more than")

    @property
    def transition_channels(self) -> list[int]:
        """Channels out of each transition: floor(theta * m) of the m its dense block gives."""
        widths, channels = [], self.num_init_features
        for layers in self.block_config[:-1]:
            channels = int((channels + layers * self.growth_rate) * self.compression)
            widths.append(channels)
        return widths

    @property
    def num_parameters(self) -> int:
        """The network's parameter count, from the config alone: nothing is allocated."""
        k, bn = self.growth_rate, self.bn_size
        count = (7 * 7 if self.stem == "imagenet" else 3 * 3) * self.in_channels
        count *= self.num_init_features
        if self.stem == "imagenet":
            count += 2 * self.num_init_features  # norm0
        block_inputs = [self.num_init_features, *self.transition_channels]
        for i, (layers, channels) in enumerate(zip(self.block_config, block_inputs, strict=True)):
            # Each layer's first BN and conv see its input channels: channels + j*k for layer j.
            inputs = layers * channels + k * layers * (layers - 1) // 2
            if bn:  # BN, 1x1 conv to bn*k, BN, 3x3 conv to k
                count += (2 + bn * k) * inputs + layers * (2 * bn * k + 9 * bn * k * k)
            else:  # BN, 3x3 conv to k
                count += (2 + 9 * k) * inputs
            out = channels + layers * k
            if i + 1 < len(block_inputs):  # the transition: BN, 1x1 conv
                count += 2 * out + out * block_inputs[i + 1]
        count += 2 * out  # the final BN
        return count + (out + 1) * self.num_classes

    @property
    def efficient_parts(self) -> EfficientParts:
        efficient = self.memory_efficient
        return EfficientParts(
            # The CIFAR stem is a lone convolution: autograd keeps only its input anyway.
            stem=efficient and self.stem == "imagenet",
            blocks=efficient,
            # Dropout sits between a transition's convolution and its pool, which commute (and so
            # can be swapped to save memory) only without it.
            transitions=efficient and self.drop_rate == 0,
        )

    def check_input(self, x: Tensor) -> None:
        """Refuse an input a network of this config cannot process, before any computation."""
        if x.dim() != 4:
            raise ConfigError(
                f"expected a 4-D batch (N, C, H, W), got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ConfigError(
                f"expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        self.stage_sizes(x.shape[2], x.shape[3])

    def replace(self, **changes: object) -> DenseNetConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["block_config"] = list(self.block_config)
        return data

    @classmethod
    def from_dict(cls, data: object) -> DenseNetConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {brief(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    @property
    def min_input_size(self) -> int:
        """Smallest input side for which every transition still has a 2x2 map to pool."""
        last_block_min = 2 ** (len(self.block_config) - 1)
        # The ImageNet stem (Conv7x7/2 pad 3, MaxPool3x3/2 pad 1) maps n to ceil(ceil(n / 2) / 2).
        return 4 * last_block_min - 3 if self.stem == "imagenet" else last_block_min

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size seen by each dense block for an input of ``height`` x ``width``."""
        if min(height, width) < self.min_input_size:
            raise ConfigError(
                f"input {height}x{width} is too small for {len(self.block_config)} dense blocks "
                f"with the {self.stem} stem: each side must be at least {self.min_input_size} px"
            )
        h, w = height, width
        if self.stem == "imagenet":
            h, w = (h + 3) // 4, (w + 3) // 4
        sizes = [(h, w)]
        for _ in self.block_config[1:]:
            h, w = h // 2, w // 2
            sizes.append((h, w))
        return sizes


def _too_large(what: str) -> ConfigError:
    return ConfigError(
        f"{what} the {MAX_PARAMETERS:,} allowed (DenseNet-264 has 33 million): choose a smaller "
        "growth_rate, bn_size, num_init_features, block_config or num_classes"
    )


def _hooked(module: nn.Module) -> bool:
    """Whether a hook may see ``module``'s input or output (the test nn.Module's call makes)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def norm_relu(norm: nn.Module, relu: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(x))`` (``relu`` may be any module), overwriting the norm's output where no one
    can see it.

    The ReLU modules are not in place, so that a hook (Grad-CAM, feature extraction) may hold their
    input. Yet a BatchNorm's output is a fresh tensor that only the ReLU reads, and BatchNorm's
    backward needs its input, not its output: unless a hook is attached to either module, the ReLU
    can reuse that memory, as torchvision's in-place ReLU always does. That saves one tensor the
    size of every layer's input, in time and in peak memory.
    """
    out = norm(x)
    if (
        type(relu) is nn.ReLU
        and isinstance(norm, nn.BatchNorm2d)
        and not (_hooked(norm) or _hooked(relu))
    ):
        return out.relu_()
    return relu(out)


def run_layers(layers: list[nn.Module], x: Tensor) -> Tensor:
    """``x`` through ``layers`` in order; a BatchNorm and the layer after it go through
    :func:`norm_relu`."""
    i = 0
    while i < len(layers):
        if isinstance(layers[i], nn.BatchNorm2d) and i + 1 < len(layers):
            x = norm_relu(layers[i], layers[i + 1], x)
            i += 2
        else:
            x = layers[i](x)
            i += 1
    return x


class Features(nn.Sequential):
    """The stem, dense blocks, transitions and final BN-ReLU, run by :func:`run_layers`."""

    def forward(self, x: Tensor) -> Tensor:
        return run_layers(list(self), x)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


class DenseLayer(nn.Module):
    """H_l: maps the concatenation of all earlier feature maps to ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bottleneck = bn_size > 0
        # ReLUs are not in place: a forward hook (Grad-CAM, feature maps) may hold their input.
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        if self.bottleneck:
            self.conv1 = _conv(in_channels, bn_size * growth_rate, 1)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU()
            self.conv2 = _conv(bn_size * growth_rate, growth_rate, 3)
        else:
            self.conv1 = _conv(in_channels, growth_rate, 3)

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x

    def forward(self, features: Tensor | list[Tensor]) -> Tensor:
        """``features``: the earlier feature maps, one tensor or a list to concatenate.

        Concatenated here, a list's concatenation is let go as soon as the BN-ReLU has read it
        (in evaluation: training keeps it for BN's backward) instead of being held by the caller
        for the whole layer; the allocations that follow can then reuse its memory, which on CPUs
        is measurably faster than fresh pages.
        """
        if isinstance(features, list):  # no name holds the concatenation: BN-ReLU frees it
            out = self.conv1(norm_relu(self.norm1, self.relu1, torch.cat(features, 1)))
        else:
            out = self.conv1(norm_relu(self.norm1, self.relu1, features))
        out = self._dropout(out)
        if self.bottleneck:
            out = self._dropout(self.conv2(norm_relu(self.norm2, self.relu2, out)))
        return out


class _PooledTraining(nn.Module):
    """A module whose memory-efficient training takes its large CPU tensors from
    ``buffer_pool``, which keeps them for the next step (shared by a network's modules); switched
    to evaluation, it lets go of them."""

    buffer_pool: BufferPool

    def train(self, mode: bool = True):
        if not mode:
            self.buffer_pool.release()
        return super().train(mode)


class DenseBlock(_PooledTraining, nn.ModuleDict):
    """Layer l receives [x_0, x_1, ..., x_{l-1}] concatenated along channels."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
        buffer_pool: BufferPool | None = None,
    ) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        self.buffer_pool = buffer_pool or BufferPool()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and self.training:
            return efficient.dense_block_forward(
                list(self.values()), x, self.out_channels, self.buffer_pool
            )
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(_PooledTraining):
    """BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks, compressing m channels to floor(theta*m).

    ``memory_efficient`` needs ``drop_rate`` 0 (see :attr:`DenseNetConfig.efficient_parts`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        drop_rate: float,
        memory_efficient: bool = False,
        buffer_pool: BufferPool | None = None,
    ) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient
        self.buffer_pool = buffer_pool or BufferPool()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = _conv(in_channels, out_channels, 1)
        self.pool = nn.AvgPool2d(2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and self.training:
            return efficient.transition_forward(self, x, self.buffer_pool)
        x = self.conv(norm_relu(self.norm, self.relu, x))
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.pool(x)


class DenseNet(nn.Module):
    """A DenseNet built from a :class:`DenseNetConfig` (or the same fields as keywords)."""

    def __init__(self, config: DenseNetConfig | None = None, **fields: object) -> None:
        super().__init__()
        if config is None:
            config = DenseNetConfig(**fields)  # type: ignore[arg-type]
        elif fields:
            config = config.replace(**fields)
        self.config = config

        stem_channels = config.num_init_features
        if config.stem == "imagenet":
            layers = (
                nn.Conv2d(config.in_channels, stem_channels, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            stem = list(zip(IMAGENET_STEM, layers, strict=True))
        else:
            stem = [("conv0", _conv(config.in_channels, stem_channels, 3))]
        self.features = Features()
        for name, module in stem:
            self.features.add_module(name, module)

        efficient_parts = config.efficient_parts
        # Memory-efficient training's large tensors, shared by the stem, blocks and transitions:
        # one step's free buffers serve the next step's tensors of any of them.
        self.buffer_pool = BufferPool()
        channels = stem_channels
        for i, num_layers in enumerate(config.block_config):
            block = DenseBlock(
                num_layers,
                channels,
                config.growth_rate,
                config.bn_size,
                config.drop_rate,
                efficient_parts.blocks,
                self.buffer_pool,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(config.block_config) - 1:
                out_channels = int(channels * config.compression)
                transition = Transition(
                    channels,
                    out_channels,
                    config.drop_rate,
                    efficient_parts.transitions,
                    self.buffer_pool,
                )
                self.features.add_module(f"transition{i + 1}", transition)
                channels = out_channels
        self.features.add_module(f"norm{len(config.block_config) + 1}", nn.BatchNorm2d(channels))
        self.features.add_module("relu", nn.ReLU())

        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Module = self._make_classifier(config.num_classes)
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        classifier = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(classifier.bias)
        return classifier

    def _init_weights(self) -> None:
        # The authors' Lua code draws conv weights from N(0, sqrt(2 / (k*k*out_channels))).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map, after the last BN-ReLU and before pooling."""
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self.config.check_input(x)
            if self.training and self.config.memory_efficient:
                self.buffer_pool.next_step()
        if not (self.training and self.config.efficient_parts.stem):
            return self.features(x)
        features = self.features
        x = efficient.stem_forward(
            features.norm0, features.pool0, features.conv0(x), self.buffer_pool
        )
        rest = [layer for name, layer in features.named_children() if name not in IMAGENET_STEM]
        return run_layers(rest, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it)."""
        self.config = self.config.replace(num_classes=num_classes)
        device = next(self.parameters()).device
        self.classifier = self._make_classifier(num_classes).to(device)
