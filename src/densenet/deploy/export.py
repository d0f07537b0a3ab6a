"""Writing the inference network as ONNX, TorchScript or a torch.export program, then checking it.

Every export is re-loaded with its own runtime (onnxruntime, ``torch.jit.load``,
``torch.export.load``) and run on a batch of a different size than the one traced, against the
float32 eager model: a file is only reported as written if it computes the same logits.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from densenet.deploy.optimize import INFERENCE_PRECISIONS, optimize_for_inference
from densenet.errors import ConfigError, DenseNetError, first_line, require
from densenet.files import staged
from densenet.hardware import DTYPES, Precision
from densenet.models.densenet import DenseNet
from densenet.models.presets import MAX_IMAGE_SIZE

FORMATS = ("onnx", "torchscript", "exported-program")
# Largest |exported - eager| allowed, relative to the largest |eager logit|.
TOLERANCE: dict[Precision, float] = {"fp32": 1e-5, "bf16": 2e-2}
TRACE_BATCH, CHECK_BATCH = 2, 3


class ExportError(DenseNetError):
    """An export that could not be written, or that does not reproduce the eager model."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    precision: str
    check_batch: int
    max_abs_diff: float
    relative_diff: float
    tolerance: float


def export_model(
    model: DenseNet,
    path: str | os.PathLike[str],
    format: str,
    *,
    precision: Precision = "fp32",
    input_size: tuple[int, int] | None = None,
) -> ExportReport:
    """Write ``model``'s inference network to ``path`` and check it against ``model`` (eval)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of {', '.join(INFERENCE_PRECISIONS)}"
        )
    if format == "onnx" and precision == "bf16":
        raise ConfigError(
            "onnxruntime has no bfloat16 convolutions on CPU, so a bf16 ONNX file could not be "
            "checked; export ONNX as fp32 (runtimes can lower precision themselves) or use "
            "--format exported-program/torchscript for bf16"
        )
    if format == "onnx":
        require("onnx", "onnxscript", "onnxruntime", purpose="ONNX export", extra="export")
    path = Path(path)
    if format == "exported-program" and path.suffix != ".pt2":
        raise ConfigError(f"exported programs are .pt2 archives; name the output {path.stem}.pt2")
    _check_writable(path)
    model = model.eval()
    height, width = input_size or _default_input_size(model)
    if max(height, width) > MAX_IMAGE_SIZE:
        # The model runs on a batch at this size, so the size decides the memory it takes.
        raise ConfigError(
            f"input size {height}x{width} is larger than the {MAX_IMAGE_SIZE} px per side "
            "allowed; export at the size the model is used at (the batch stays dynamic)"
        )
    model.config.stage_sizes(height, width)  # a clear error for an input that is too small
    # Exporters trace standard convolutions; oneDNN's reordered weights are opaque to them.
    network = optimize_for_inference(model, dtype=DTYPES[precision], conv_backend="aten")
    example = torch.randn(TRACE_BATCH, model.config.in_channels, height, width)

    writer, loader = _FORMATS[format]
    # Written and checked under a temporary name: only a file that reproduces the model lands at
    # path, and a failed export leaves whatever was there before.
    with staged(path) as tmp:
        try:
            writer(network, example, tmp)
        except DenseNetError:
            raise
        except Exception as error:
            raise ExportError(f"{format} export failed: {first_line(error)}") from None

        check = torch.randn(CHECK_BATCH, model.config.in_channels, height, width)
        with torch.inference_mode():
            expected = model(check)
        try:
            actual = loader(tmp)(check)
        except Exception as error:
            raise ExportError(f"the exported {path} does not run: {first_line(error)}") from None
        max_abs = (actual.float() - expected).abs().max().item()
        relative = max_abs / max(expected.abs().max().item(), 1e-12)
        report = ExportReport(
            path, format, precision, CHECK_BATCH, max_abs, relative, TOLERANCE[precision]
        )
        if not relative <= report.tolerance:
            raise ExportError(
                f"the {format} export does not reproduce the eager model: max difference "
                f"{max_abs:.3g} ({relative:.3g} relative) exceeds {report.tolerance:g}; "
                f"{path} was not written"
            )
    return report


def _default_input_size(model: DenseNet) -> tuple[int, int]:
    return (224, 224) if model.config.stem == "imagenet" else (32, 32)


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"output {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None


def _batch_dim() -> dict[str, dict[int, object]]:
    return {"x": {0: torch.export.Dim("batch", min=1)}}


def _write_onnx(network: torch.nn.Module, example: Tensor, path: Path) -> None:
    torch.onnx.export(
        network,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes=_batch_dim(),
        external_data=False,
        verbose=False,
    )


def _load_onnx(path: Path) -> Callable[[Tensor], Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        (logits,) = session.run(None, {"x": x.numpy()})
        return torch.from_numpy(logits)

    return run


def _write_torchscript(network: torch.nn.Module, example: Tensor, path: Path) -> None:
    # The user asked for TorchScript: its deprecation notice is not news to them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(network).save(str(path))


def _load_torchscript(path: Path) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))
    return lambda x: module(x)


def _write_exported_program(network: torch.nn.Module, example: Tensor, path: Path) -> None:
    program = torch.export.export(network, (example,), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def _load_exported_program(path: Path) -> Callable[[Tensor], Tensor]:
    return torch.export.load(str(path)).module()


_FORMATS = {
    "onnx": (_write_onnx, _load_onnx),
    "torchscript": (_write_torchscript, _load_torchscript),
    "exported-program": (_write_exported_program, _load_exported_program),
}
