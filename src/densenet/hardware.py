"""Choosing the device, the autocast precision and the memory layout for the hardware at hand."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from densenet.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def cpu_has_amx() -> bool:
    """AMX tiles make bf16 matrix maths several times faster than fp32 on recent Xeons."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def default_precision(device: torch.device) -> str:
    """bf16 where the hardware has fast bf16 units (Ampere+ GPUs, AMX CPUs), fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"


def default_memory_format(device: torch.device, precision: str) -> str:
    # oneDNN and cuDNN both run convolutions faster in NHWC, most of all with bf16/fp16; fp32 on
    # a GPU gains little and some older cuDNN kernels lose, so it stays NCHW there.
    if device.type == "cuda" and precision == "fp32":
        return "contiguous"
    return "channels_last"


def check_precision(device: torch.device, precision: str) -> None:
    if precision == "fp16" and device.type == "cpu":
        return  # supported, if slow: CPUs without AVX512-FP16 emulate it
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use --precision fp16 or fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def to_memory_format(tensor: torch.Tensor, memory_format: str) -> torch.Tensor:
    if memory_format == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor
