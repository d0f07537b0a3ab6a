"""A per-stage description of a model, like the paper's Table 1, measured by running it.

MACs are half the FLOPs torch's FlopCounterMode counts in one forward pass (it counts a
multiply-add as two), which for a DenseNet are those of its convolutions and the classifier.
Activation memory is what autograd saves for the backward pass, attributed to the stage that saved
it (each storage counted once): the memory a training step needs beyond the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from densenet.models.densenet import IMAGENET_STEM, DenseBlock, DenseNet, Transition


@dataclass
class StageSummary:
    name: str
    output_size: tuple[int, int] | None
    channels: int
    layers: str
    params: int
    macs: int  # per image
    activation_bytes: int  # for the whole batch


@dataclass
class ModelSummary:
    stages: list[StageSummary]
    input_size: tuple[int, int]
    batch_size: int

    @property
    def params(self) -> int:
        return sum(stage.params for stage in self.stages)

    @property
    def macs(self) -> int:
        return sum(stage.macs for stage in self.stages)

    @property
    def activation_bytes(self) -> int:
        return sum(stage.activation_bytes for stage in self.stages)


def _describe(module: nn.Module) -> str:
    if isinstance(module, DenseBlock):
        first = next(iter(module.values()))
        convs = "1x1 conv, 3x3 conv" if first.bottleneck else "3x3 conv"
        return f"{len(module)} x [{convs}]"
    if isinstance(module, Transition):
        return "1x1 conv, 2x2 avg pool"
    kinds = {nn.Conv2d: "conv", nn.MaxPool2d: "max pool", nn.Linear: "linear"}
    parts = []
    for sub in module.modules():
        for kind, label in kinds.items():
            if isinstance(sub, kind):
                size = getattr(sub, "kernel_size", None)
                size = size[0] if isinstance(size, tuple) else size
                stride = getattr(sub, "stride", 1)
                stride = stride[0] if isinstance(stride, tuple) else stride
                prefix = f"{size}x{size} " if size else ""
                parts.append(f"{prefix}{label}" + (f", stride {stride}" if stride != 1 else ""))
    return "; ".join(parts) or "-"


def _stages(model: DenseNet) -> list[tuple[str, list[nn.Module]]]:
    """Group the model into the paper's rows: stem, each block, each transition, classifier."""
    stages: list[tuple[str, list[nn.Module]]] = [("stem", [])]
    for name, module in model.features.named_children():
        if isinstance(module, DenseBlock | Transition):
            stages.append((name, [module]))
        elif name in IMAGENET_STEM:
            stages[0][1].append(module)
        else:  # final BN-ReLU belongs with the classification layer, as in Table 1
            if stages[-1][0] != "classifier":
                stages.append(("classifier", []))
            stages[-1][1].append(module)
    stages[-1][1].extend([model.global_pool, model.classifier])
    return stages


# Batches above this are not run: what autograd saves is an affine function of the batch size
# (activations per image, plus per-channel statistics), so two small batches give it exactly.
LARGEST_RUN_BATCH = 4


def summarize(model: DenseNet, input_size: tuple[int, int], batch_size: int = 1) -> ModelSummary:
    """Run training-mode forward passes on random input and measure each stage."""
    if batch_size <= LARGEST_RUN_BATCH:
        return _measure(model, input_size, batch_size)
    small, large = _measure(model, input_size, 2), _measure(model, input_size, LARGEST_RUN_BATCH)
    for stage, other in zip(small.stages, large.stages, strict=True):
        per_image = (other.activation_bytes - stage.activation_bytes) // (LARGEST_RUN_BATCH - 2)
        stage.activation_bytes += per_image * (batch_size - 2)
    small.batch_size = batch_size
    return small


def _measure(model: DenseNet, input_size: tuple[int, int], batch_size: int) -> ModelSummary:
    """One training-mode forward pass of ``batch_size`` random images, measured per stage."""
    stages = _stages(model)
    flops = {name: 0 for name, _ in stages}
    saved = {name: 0 for name, _ in stages}
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, int]] = set()
    current = ["stem"]
    counter = FlopCounterMode(display=False)
    counted = [0]  # the counter's total when the current stage was entered
    handles = []

    def close_stage() -> None:
        total = counter.get_total_flops()
        flops[current[0]] += total - counted[0]
        counted[0] = total

    def enter(stage: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            close_stage()
            current[0] = stage

        return hook

    def record_output(stage: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            shapes[stage] = tuple(output.shape)

        return hook

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        # Parameters are weights, not activations; shared storages (views, cat inputs) count once.
        if key not in seen and storage.data_ptr() not in weight_pointers:
            seen.add(key)
            saved[current[0]] += storage.nbytes()
        return tensor

    for stage, modules in stages:
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter(stage)))
            handles.append(module.register_forward_hook(record_output(stage)))

    weight_pointers = {p.untyped_storage().data_ptr() for p in model.parameters()}
    device = next(model.parameters()).device
    x = torch.randn(batch_size, model.config.in_channels, *input_size, device=device)
    was_training = model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.requires_grad_(False))
            close_stage()
    finally:
        for handle in handles:
            handle.remove()
        model.load_state_dict(state)  # undo the BN running-statistics update
        model.train(was_training)

    rows = []
    for stage, modules in stages:
        params = sum(p.numel() for m in modules for p in m.parameters())
        shape = shapes.get(stage, ())
        rows.append(
            StageSummary(
                name=stage,
                output_size=(shape[2], shape[3]) if len(shape) == 4 else (1, 1),
                channels=shape[1] if len(shape) >= 2 else 0,
                layers="; ".join(_describe(m) for m in modules if _describe(m) != "-"),
                params=params,
                macs=flops[stage] // 2 // batch_size,
                activation_bytes=saved[stage],
            )
        )
    return ModelSummary(rows, input_size, batch_size)


def format_summary(title: str, summary: ModelSummary) -> str:
    header = (
        f"{'stage':<13}{'output':>10}{'channels':>10}{'params':>13}{'MMACs':>11}{'act. MB':>10}"
        "  layers"
    )
    lines = [title, header, "-" * len(header)]
    for s in summary.stages:
        out = f"{s.output_size[0]}x{s.output_size[1]}" if s.output_size else "-"
        lines.append(
            f"{s.name:<13}{out:>10}{s.channels:>10}{s.params:>13,}{s.macs / 1e6:>11.1f}"
            f"{s.activation_bytes / 2**20:>10.1f}  {s.layers}"
        )
    lines.append("-" * len(header))
    h, w = summary.input_size
    lines.append(
        f"total: {summary.params:,} parameters, {summary.macs / 1e9:.3f} GMACs per image at "
        f"{h}x{w}, {summary.activation_bytes / 2**20:.1f} MB activations saved for backward "
        f"at batch {summary.batch_size} (fp32)"
    )
    return "\n".join(lines)
