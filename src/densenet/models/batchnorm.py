"""Batch normalisation whose statistics cover the global batch of every process.

torch's ``nn.SyncBatchNorm`` runs only on GPUs; :class:`SyncBatchNorm2d` here synchronises batch
statistics on any device, so multi-process CPU training (and its tests) use the same code as CUDA.
The memory-efficient path (``densenet.models.efficient``) computes its statistics itself and shares
:func:`combine_batch_stats` and :func:`update_running_stats` with it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


def combine_batch_stats(parts: Tensor, channels: int) -> tuple[Tensor, Tensor, int]:
    """Global per-channel mean, biased variance and count from each process's own.

    ``parts`` holds one row per process: its ``channels`` means, ``channels`` variances and its
    count. The parts are combined as deviations from the global mean (Chan et al.'s parallel
    variance), which keeps float32 statistics as accurate as one process's; a difference of sums of
    squares would lose digits to cancellation when a channel's mean is large next to its spread.
    """
    means, variances, counts = parts[:, :channels], parts[:, channels:-1], parts[:, -1:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
    return mean, var, int(n.item())


def update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """BatchNorm2d's training-mode update of its running statistics, once per forward pass.

    For code that computes a batch's mean and biased variance (over ``count`` values per channel)
    itself instead of calling BatchNorm2d.forward.
    """
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
    unbiased = var * (count / max(count - 1, 1))
    norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), momentum)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the whole global batch.

    Each process contributes its per-channel mean, variance and count to one all-gather, combined
    by :func:`combine_batch_stats`. The all-gather is differentiable, so gradients flow to every
    process's inputs exactly as in one process holding the whole batch. Parameter and buffer names
    are BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        local = x.float()
        channels = x.shape[1]
        local_var, local_mean = torch.var_mean(local, dim=(0, 2, 3), correction=0)
        count = torch.full((1,), x.numel() / channels, device=x.device)
        parts = torch.stack(dist_fn.all_gather(torch.cat([local_mean, local_var, count])))
        mean, var, n = combine_batch_stats(parts, channels)
        with torch.no_grad():
            update_running_stats(self, mean, var, n)
        shape = (1, channels, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        out = (local - mean.view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` with a :class:`SyncBatchNorm2d` holding its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            ).to(child.running_mean.device)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
