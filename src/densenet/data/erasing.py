"""Random erasing (Zhong et al., 2017) of a whole batch on the device, after normalisation.

Each image, with probability ``p``, gets one rectangle set to 0, which after normalisation is the
dataset's mean, as torchvision's ``RandomErasing(value=0)`` after ``Normalize`` does. The
rectangle is drawn as torchvision draws it: an area share ~ U(0.02, 1/3) and an aspect ratio
log-uniform in (0.3, 3.3), redrawn up to 10 times until it fits inside the image (an image with no
fitting draw is left as it is), then a uniform place. The draws come from a generator seeded per
training step, so a resumed run erases exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AREA = (0.02, 1 / 3)
RATIO = (0.3, 3.3)
TRIES = 10


def erase_batch(images: Tensor, p: float, seed: int) -> Tensor:
    """``images`` (N, C, H, W) with a random rectangle of some of them set to 0."""
    n, _, height, width = images.shape
    # Drawn on the CPU (the same numbers on any device), then a few vectors go to the device.
    boxes = _draw_boxes(n, height, width, p, torch.Generator().manual_seed(seed))
    erased, top, left, box_h, box_w = (part.to(images.device) for part in boxes)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    mask = erased[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    return images.masked_fill(mask[:, None], 0)


def _draw_boxes(
    n: int, height: int, width: int, p: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per image: whether it is erased, and its rectangle's top, left, height and width."""
    erased = torch.rand(n, generator=generator) < p
    area = height * width * torch.empty(n, TRIES).uniform_(*AREA, generator=generator)
    log_ratio = torch.empty(n, TRIES).uniform_(*map(math.log, RATIO), generator=generator)
    box_h = (area * log_ratio.exp()).sqrt().round().long()
    box_w = (area / log_ratio.exp()).sqrt().round().long()
    fits = (box_h < height) & (box_w < width)
    # The first draw that fits, per image: argmax finds a row's first True (0 if it has none).
    first = fits.long().argmax(1, keepdim=True)
    erased &= fits.any(1)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    top = _uniform_below(height - box_h + 1, generator)
    left = _uniform_below(width - box_w + 1, generator)
    return erased, top, left, box_h, box_w


def _uniform_below(bounds: Tensor, generator: torch.Generator) -> Tensor:
    """An integer uniform in [0, bound) for each of ``bounds``."""
    drawn = (torch.rand(len(bounds), generator=generator, dtype=torch.float64) * bounds).long()
    return torch.minimum(drawn, bounds - 1)  # u * bound can round up to bound itself
