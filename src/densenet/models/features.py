"""A DenseNet as a multi-scale backbone: the feature maps a detector or segmenter builds on.

Level 0 is the stem's output; level i >= 1 is the output of dense block i (the concatenation of all
its layers), and the last level also passes the final BN-ReLU, as the classifier sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from densenet.errors import ConfigError
from densenet.models.densenet import DenseNet, DenseNetConfig


@dataclass(frozen=True)
class FeatureInfo:
    level: int
    module: str  # the module of ``model.features`` whose output this level is
    channels: int
    stride: int  # input pixels per feature-map pixel


def feature_levels(config: DenseNetConfig) -> list[FeatureInfo]:
    """Every level a DenseNet of ``config`` can return, from the config alone."""
    num_blocks = len(config.block_config)
    imagenet = config.stem == "imagenet"
    # The ImageNet stem halves the input twice: after its strided conv, and in its max pool.
    levels = [
        FeatureInfo(0, "relu0" if imagenet else "conv0", config.num_init_features, 2**imagenet)
    ]
    channels, stride = config.num_init_features, 4 if imagenet else 1
    for i, num_layers in enumerate(config.block_config):
        channels += num_layers * config.growth_rate
        last = i == num_blocks - 1
        levels.append(
            FeatureInfo(i + 1, "relu" if last else f"denseblock{i + 1}", channels, stride)
        )
        if not last:
            channels, stride = int(channels * config.compression), stride * 2
    return levels


class FeatureExtractor(nn.Module):
    """Runs a DenseNet's feature layers and returns the maps of the levels in ``out_indices``.

    Layers past the deepest requested level are dropped, so they cost neither compute nor
    parameters; the classifier is never kept.
    """

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = model.config
        levels = feature_levels(model.config)
        indices = range(len(levels)) if out_indices is None else out_indices
        self.feature_info = [levels[self._level(i, len(levels))] for i in indices]
        if not self.feature_info:
            raise ConfigError("out_indices must name at least one level")
        if sorted(set(self.feature_info), key=lambda f: f.level) != self.feature_info:
            raise ConfigError(f"out_indices must be increasing and distinct, got {list(indices)}")
        self._taps = {info.module for info in self.feature_info}
        self.features = nn.Sequential()
        for name, module in model.features.named_children():
            self.features.add_module(name, module)
            if name == self.feature_info[-1].module:
                break

    @staticmethod
    def _level(index: int, count: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ConfigError(
                f"out_indices entries must be integers in [{-count}, {count - 1}] "
                f"(levels 0..{count - 1}: stem, then each dense block), got {index!r}"
            )
        return index % count

    @property
    def channels(self) -> list[int]:
        return [info.channels for info in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [info.stride for info in self.feature_info]

    def forward(self, x: Tensor) -> list[Tensor]:
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self.config.check_input(x)
        outputs = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                outputs.append(x)
        return outputs
