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
    model: DenseNet,
    lr: float,
    backbone_lr_scale: float = 0.1,
    weight_decay: float | None = None,
) -> list[dict[str, object]]:
    """Optimizer parameter groups: the head at ``lr``, the backbone at ``lr * backbone_lr_scale``.

    With a ``weight_decay``, BatchNorm weights and all biases (the parameters of one dimension)
    get groups of their own without decay: decaying them only shrinks a scale or shift that the
    next layer undoes, and timm and torchvision recipes exempt them. Frozen parameters are left
    out, so this also suits a model after :func:`freeze_backbone`.
    """
    if not 0.0 <= backbone_lr_scale <= 1.0:
        raise ConfigError(f"backbone_lr_scale must be in [0, 1], got {backbone_lr_scale!r}")
    backbone, head = backbone_and_head(model)
    groups = []
    for name, params, group_lr in (
        ("backbone", backbone, lr * backbone_lr_scale),
        ("head", head, lr),
    ):
        params = [p for p in params if p.requires_grad]
        if weight_decay is None:
            groups.append({"name": name, "params": params, "lr": group_lr})
            continue
        decayed = [p for p in params if p.ndim > 1]
        exempt = [p for p in params if p.ndim <= 1]
        groups.append(
            {"name": name, "params": decayed, "lr": group_lr, "weight_decay": weight_decay}
        )
        groups.append(
            {"name": f"{name}_no_decay", "params": exempt, "lr": group_lr, "weight_decay": 0.0}
        )
    return [group for group in groups if group["params"]]
