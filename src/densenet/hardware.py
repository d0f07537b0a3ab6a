"""Choosing the device, the autocast precision and the memory layout for the hardware at hand."""

from __future__ import annotations

import contextlib
import typing
from pathlib import Path
from typing import Literal

import torch

from densenet.errors import ConfigError, check_choice

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = typing.get_args(Precision)
DTYPES: dict[Precision, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
MemoryFormat = Literal["channels_last", "contiguous"]
# What a user may ask for: "auto" leaves the choice to resolve_precision_and_format.
PrecisionChoice = Literal["auto", Precision]
MemoryFormatChoice = Literal["auto", MemoryFormat]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    return device


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields in ``path`` ("model name", "flags", ...); empty if unreadable.

    Every processor repeats the same fields, each block ending at a blank line.
    """
    try:
        text = path.read_text()
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (avx2, avx512f, amx_bf16, ...); empty where the kernel lists none."""
    return frozenset(cpu_info().get("flags", "").split())


def resolve_precision_and_format(
    device: torch.device,
    precision: PrecisionChoice = "auto",
    memory_format: MemoryFormatChoice = "auto",
) -> tuple[Precision, MemoryFormat]:
    """The precision and memory layout to run in on ``device``.

    "auto" picks what is fast there; a precision the hardware cannot run is refused.
    """
    check_choice("precision", precision, typing.get_args(PrecisionChoice))
    check_choice("memory_format", memory_format, typing.get_args(MemoryFormatChoice))
    resolved = _default_precision(device) if precision == "auto" else precision
    # fp16 runs everywhere (slowly on CPUs without AVX512-FP16); bf16 needs GPU support.
    if resolved == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use --precision fp16 or fp32")
    if memory_format == "auto":
        return resolved, _default_memory_format(device, resolved)
    return resolved, memory_format


def _default_precision(device: torch.device) -> Precision:
    return "bf16" if fast_bf16(device) else "fp32"


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: Ampere and later GPUs; CPUs whose oneDNN has
    bf16 kernels (AVX512_BF16 or AMX). Elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def has_amx() -> bool:
    """Whether the CPU has AMX tile units (oneDNN's fastest bf16 and int8 kernels)."""
    # torch.cpu has had this query since 2.3; before that there is no AMX path to report.
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_kernels() -> str:
    """The CPU's kernel set as PyTorch reports it, and AMX where it has it: "AVX512 with AMX"."""
    return torch.backends.cpu.get_cpu_capability() + (" with AMX" if has_amx() else "")


def why_precision(device: torch.device, precision: Precision) -> str:
    """Why "auto" chose ``precision`` on ``device``, for the first line of a run."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        units = "has" if precision == "bf16" else "lacks"
        return f"this GPU (compute capability {major}.{minor}) {units} native bf16"
    if precision == "bf16":
        return f"this CPU ({cpu_kernels()}) has native bf16 in oneDNN"
    return f"this CPU ({cpu_kernels()}) has no native bf16"


def _default_memory_format(device: torch.device, precision: Precision) -> MemoryFormat:
    # oneDNN and cuDNN both run convolutions faster in NHWC, most of all with bf16/fp16; fp32 on
    # a GPU gains little and some older cuDNN kernels lose, so it stays NCHW there.
    if device.type == "cuda" and precision == "fp32":
        return "contiguous"
    return "channels_last"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def to_memory_format(tensor: torch.Tensor, memory_format: MemoryFormat) -> torch.Tensor:
    if memory_format == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor
