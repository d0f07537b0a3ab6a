"""Where a DenseNet looks: Grad-CAM (Selvaraju et al., ICCV 2017) and Grad-CAM++ (Chattopadhay
et al., WACV 2018) heatmaps, as CheXNet showed clinicians for chest X-rays.

Both weigh the channels of one layer's output ``A`` (by default the final feature map: the last
dense block's output after ``norm5`` and its ReLU, the ``features.relu`` module) by the gradient of
the explained class's logit ``y`` with respect to ``A``, and keep the positive part of the sum:

- Grad-CAM: ``w_k = mean_ij dy/dA_kij``;
- Grad-CAM++: ``w_k = sum_ij a_kij relu(dy/dA_kij)`` with
  ``a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3)``, ``g = dy/dA_kij``: the paper's closed form for the
  score ``exp(y)``, whose higher derivatives are powers of the first; its factor ``exp(y)`` scales
  every weight of an image alike, so the normalised map does not depend on it.

The map is upsampled bilinearly to the input's size and divided by its maximum, so 1 is the most
important place of each image; a map with no positive evidence is all zeros.

The ``grad-cam`` package is not used: it pulls in OpenCV and is built around torchvision-style
in-place ReLUs, while this package's ReLUs are not in place, so plain hooks see every activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.errors import ConfigError, check_choice
from densenet.models.densenet import DenseNet

Method = Literal["gradcam", "gradcam++"]


@dataclass(frozen=True)
class Explanation:
    """Heatmaps for a batch of inputs, and what they explain."""

    maps: Tensor  # (N, H, W) float32 in [0, 1], at the input's resolution
    targets: Tensor  # (N,) the class each map explains
    logits: Tensor  # (N, num_classes) the model's outputs for the inputs


def explain(
    model: DenseNet,
    images: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    method: Method = "gradcam",
    layer: str | None = None,
) -> Explanation:
    """Grad-CAM or Grad-CAM++ heatmaps of ``model`` for a batch of normalised inputs (N, C, H, W).

    ``target`` is the class to explain: one index for every image, one per image, or ``None`` for
    each image's top class. The score differentiated is the class's logit, as in both papers: for a
    single-label (softmax) model the top logit is the top class, and for a multi-label (sigmoid)
    model, such as CheXNet, each logit is one finding's score. ``layer`` names a module of
    ``model.features`` ("denseblock3", "denseblock4.denselayer16"); the default is the final
    feature map (the module docstring says why).

    The model runs in eval mode and is left in the mode it was in, without hooks; parameters get no
    ``.grad``, as only the gradient with respect to the layer's output is taken.
    """
    check_choice("method", method, get_args(Method))
    module = _layer(model, layer)
    if images.ndim != 4:
        raise ConfigError(f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        # A leaf of its own: the graph starts at this layer, and its gradient is all we take.
        activation = output.detach().requires_grad_()
        captured.append(activation)
        return activation

    was_training = model.training
    handle = module.register_forward_hook(capture)
    try:
        model.eval()
        # The caller may be under inference_mode (as prediction is): gradients are needed here,
        # and an inference tensor cannot enter a graph, hence the copy.
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(images.clone())
            targets = _targets(target, logits)
            score = logits.gather(1, targets[:, None]).sum()
            (activation,) = captured
            # Images are independent in eval mode, so the sum's gradient is each image's own.
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        model.train(was_training)
    activation = activation.detach().float()
    gradient = gradient.float()
    if method == "gradcam":
        weights = gradient.mean(dim=(2, 3), keepdim=True)
    else:
        squared = gradient.pow(2)
        denominator = 2 * squared + activation.sum(dim=(2, 3), keepdim=True) * gradient.pow(3)
        # Where the gradient is zero the numerator is too; 0/1 keeps those coefficients at 0.
        alpha = squared / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * gradient.relu()).sum(dim=(2, 3), keepdim=True)
    cam = (weights * activation).sum(dim=1, keepdim=True).relu()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    maps = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)
    return Explanation(maps, targets, logits.detach())


def layer_names(model: DenseNet) -> list[str]:
    """The names ``explain`` accepts for ``layer``: every module of ``model.features``."""
    return [name for name, _ in model.features.named_modules() if name]


def _layer(model: DenseNet, name: str | None) -> nn.Module:
    if name is None:
        # The last module of features is the ReLU after norm5: its output is the final feature map.
        return model.features[-1]
    modules = dict(model.features.named_modules())
    if not name or name not in modules:
        children = ", ".join(n for n, _ in model.features.named_children())
        raise ConfigError(
            f"no layer {name!r} in the model's features; give one of {children} (or a module "
            "inside one, e.g. denseblock1.denselayer1)"
        )
    return modules[name]


def _targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    count, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    targets = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(count)
    if targets.numel() != count:
        raise ConfigError(f"{targets.numel()} targets for {count} images")
    if ((targets < 0) | (targets >= classes)).any():
        raise ConfigError(f"target classes must be in 0..{classes - 1}, got {targets.tolist()}")
    return targets


def overlay(image: Tensor, heatmap: Tensor, alpha: float = 0.5) -> np.ndarray:
    """``heatmap`` (H, W) in [0, 1], coloured with matplotlib's jet map, blended over ``image``
    (uint8 (C, H, W), grayscale or RGB): an RGB uint8 array (H, W, 3) to save as a picture."""
    # Imported here: matplotlib takes longer to import than the rest of the package's inference.
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap.detach().cpu().numpy())[..., :3]
    picture = image.detach().cpu().expand(3, -1, -1).permute(1, 2, 0).numpy() / 255
    blended = (1 - alpha) * picture + alpha * colours
    return (blended * 255).round().clip(0, 255).astype(np.uint8)
