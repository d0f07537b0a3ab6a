"""Fine-tuning a pretrained DenseNet: freeze its backbone, or train it with a smaller learning rate.

The backbone is everything but the classifier (``model.classifier``).
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from densenet.errors import ConfigError
from densenet.models.densenet import DenseNet


def backbone_and_head(model: DenseNet) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return backbone, head


def freeze_backbone(model: DenseNet) -> DenseNet:
    """Train only the head: backbone parameters stop requiring gradients, and each backbone
    BatchNorm becomes torchvision's ``FrozenBatchNorm2d``, which always normalises with the
    pretrained statistics (a plain BN in train mode would use, and overwrite, batch statistics)."""
    for parameter in backbone_and_head(model)[0]:
        parameter.requires_grad_(False)
    _freeze_batchnorms(model.features)
    return model


def _freeze_batchnorms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.weight.device))
        else:
            _freeze_batchnorms(child)


def parameter_groups(
    model: DenseNet, lr: float, backbone_lr_scale: float = 0.1
) -> list[dict[str, object]]:
    """Optimizer parameter groups: the head at ``lr``, the backbone at ``lr * backbone_lr_scale``.

    Frozen parameters are left out, so this also suits a model after :func:`freeze_backbone`.
    """
    if not 0.0 <= backbone_lr_scale <= 1.0:
        raise ConfigError(f"backbone_lr_scale must be in [0, 1], got {backbone_lr_scale!r}")
    backbone, head = backbone_and_head(model)
    groups = [
        {"name": "backbone", "params": [p for p in backbone if p.requires_grad]},
        {"name": "head", "params": [p for p in head if p.requires_grad]},
    ]
    groups[0]["lr"], groups[1]["lr"] = lr * backbone_lr_scale, lr
    return [group for group in groups if group["params"]]
