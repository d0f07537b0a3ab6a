"""An exponential moving average (EMA) of a network's weights, updated after every optimizer step.

Averaged weights are smoother than the last step's, and often evaluate better at the end of a run
with a high learning rate. BatchNorm's running statistics are averaged too (as timm's ModelEmaV2
does): the average of networks needs statistics that match its own weights only approximately,
and the averaged statistics are closer than the raw network's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights``, for every floating-point tensor of
    the network's state dict; integer buffers (BatchNorm's step count) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averages = self.model.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                averages[name].lerp_(value, 1 - self.decay)
            else:
                averages[name].copy_(value)
