"""Post-training static int8 quantization of the inference network, with a calibration set.

The float32 inference network (:class:`densenet.deploy.optimize.InferenceDenseNet`, each
bottleneck's second BN folded into its 1x1 convolution, the BN-ReLU in front of each 1x1 convolution
kept so that its input stays normalised) is captured with ``torch.export`` and quantized through
torchao's PT2E flow with the x86 quantizer: int8 weights per output channel, int8 activations per
tensor, scales taken from the calibration batches. This is PyTorch's maintained path
(``torch.ao.quantization``'s FX and eager modes are deprecated). The result runs anywhere in eager
mode, where each quantized convolution is simulated as dequantize -> float convolution -> quantize;
the int8 kernels (oneDNN, VNNI/AMX where the CPU has them) come from compiling it, ``compile=True``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from densenet.deploy.optimize import InferenceDenseNet
from densenet.errors import ConfigError, require
from densenet.models.densenet import DenseNet


def quantize_int8(
    model: DenseNet, calibration_batches: Iterable[Tensor], *, compile: bool = False
) -> nn.Module:
    """An int8 copy of ``model`` (eval semantics), calibrated on ``calibration_batches``.

    The batches are network inputs, preprocessed like real data: a few hundred representative
    images are enough. ``model`` is left untouched. ``compile`` lowers the result to int8 CPU
    kernels with ``torch.compile`` (minutes on a small CPU, on the first call of each shape); call
    the compiled network under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    # Imported here: torchao takes seconds to load and only this feature needs it.
    require("torchao", purpose="int8 quantization", extra="int8")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if not isinstance(model, DenseNet):
        raise ConfigError(f"quantize_int8 needs a densenet.DenseNet, got {type(model)}")
    batches = list(calibration_batches)
    if not batches:
        raise ConfigError("quantize_int8 needs at least one calibration batch")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(f"int8 quantization runs on the CPU; move the model there (not {device})")
    for batch in batches:
        model.config.check_input(batch)
    batch_size = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        # BN-normalised convolution inputs: one int8 scale per tensor fits them (see
        # InferenceDenseNet); folded inputs cost several points of top-1 agreement.
        network = InferenceDenseNet(model, torch.float32, onednn=False, fold_input_bn=False)
        # torch.export specialises a batch dimension it sees as 1; two rows keep it dynamic.
        example = batches[0][:1].expand(2, *batches[0].shape[1:])
        graph = torch.export.export(
            network, (example,), dynamic_shapes={"x": {0: batch_size}}
        ).module()
        config = get_default_x86_inductor_quantization_config()
        quantizer = X86InductorQuantizer().set_global(config)
        observed = prepare_pt2e(graph, quantizer)
        for batch in batches:
            observed(batch)
        quantized = convert_pt2e(observed)
    quantized.requires_grad_(False)
    return FrozenCompiled(quantized) if compile else quantized


class FrozenCompiled(nn.Module):
    """``torch.compile`` with inductor's freezing, which turns quantized patterns into int8 kernels.

    Freezing is switched on around each call, where compilation happens, rather than through
    ``torch.compile(options=...)``: with the options route (torch 2.14) the int8 weight packing is
    left in the graph and compilation fails.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, x: Tensor) -> Tensor:
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(x)
