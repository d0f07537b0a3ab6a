"""Mixup and cutmix: each training image is combined with another of its batch, and its target
with that image's label in the same proportion.

A whole batch is mixed on the device in one operation. The partner of image ``i`` is image
``n - 1 - i`` (the batch reversed, as in timm), which the shuffled data order makes a random
image; the proportion and the box are drawn from a generator seeded per (seed, epoch, step), so a
resumed run mixes exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Mixed:
    images: Tensor
    lam: float  # the share of each image's own content (and of its own label in its target)
    box: tuple[int, int, int, int] | None  # cutmix: rows y0:y1, columns x0:x1 of the partner


def mix_batch(images: Tensor, mixup_alpha: float, cutmix_alpha: float, seed: int) -> Mixed:
    """Mixup (a blend) or cutmix (a pasted box) of float ``images`` with the reversed batch.

    With both alphas above 0 each batch takes one of the two at random, evenly.
    """
    # NumPy's generator draws from a Beta distribution; torch's Beta cannot take a generator.
    rng = np.random.default_rng(seed)
    cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = images.flip(0)
    if not cutmix:
        return Mixed(images * lam + partner * (1 - lam), lam, None)
    height, width = images.shape[-2:]
    # A box of area share 1 - lam around a random centre, clipped at the edges; lam is then the
    # share that really remains, so that the target matches the pixels.
    cut = math.sqrt(1 - lam)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    half_h, half_w = round(height * cut) // 2, round(width * cut) // 2
    y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
    x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    return Mixed(mixed, lam, (y0, y1, x0, x1))


def mixed_targets(labels: Tensor, lam: float, num_classes: int) -> Tensor:
    """Targets in proportion ``lam`` of each image's own, the rest its partner's: class
    probabilities from class indices, or per-finding targets from multi-label 0/1 rows."""
    if labels.ndim == 2:
        targets = labels.float()
    else:
        targets = torch.nn.functional.one_hot(labels, num_classes).float()
    return targets * lam + targets.flip(0) * (1 - lam)
