"""Inference speed of our networks next to torchvision's DenseNet with the same weights.

Every configuration is timed on the same input after warm-up (which includes torch.compile's
compilation), in interleaved rounds: each round calls every configuration once, so that load from
elsewhere on a shared machine falls on all of them alike. The median over rounds is reported with
the fastest and slowest round, so that one slow call does not skew a result and a noisy one shows.
"""

from __future__ import annotations

import copy
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torchvision
from torch import Tensor, nn

from densenet import native
from densenet.deploy.optimize import onednn_supports, optimize_for_inference
from densenet.hardware import (
    DTYPES,
    Precision,
    autocast,
    cpu_info,
    cpu_kernels,
    fast_bf16,
    has_amx,
)
from densenet.models.densenet import DenseNet

TORCHVISION_DEFAULT = "torchvision (fp32, NCHW)"  # the model as torchvision's users run it
OURS_PLAIN = "ours, eager"  # our plain model, run as torchvision's is
T = TypeVar("T")
# Environment variables under which this CPU runs the code another would: ATen's and oneDNN's
# kernel sets, and the CPU densenet's C kernels are built for.
CPU_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DENSENET_KERNEL_MARCH")


@dataclass(frozen=True)
class Timing:
    name: str
    precision: str
    batch: int
    seconds: tuple[float, ...]  # per round, in order

    @property
    def seconds_per_batch(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds_per_batch


@dataclass(frozen=True)
class Candidate:
    """One way of running the network: a name, a precision and a callable taking the input."""

    name: str
    precision: str
    build: Callable[[], Callable[[Tensor], Tensor]]
    channels_last: bool


def torchvision_peer(name: str) -> str:
    """The name of the torchvision run that a run of our plain model is timed against."""
    return "torchvision" + name.removeprefix(OURS_PLAIN).removeprefix("ours")


def torchvision_twin(model: DenseNet) -> nn.Module | None:
    """torchvision's DenseNet with ``model``'s weights; None where torchvision can't build it."""
    config = model.config
    if config.stem != "imagenet" or config.compression != 0.5 or config.bn_size == 0:
        return None
    twin = torchvision.models.DenseNet(
        growth_rate=config.growth_rate,
        block_config=config.block_config,
        num_init_features=config.num_init_features,
        bn_size=config.bn_size,
        num_classes=config.num_classes,
    )
    # torchvision names the final BN "norm5" whatever the number of blocks.
    final_norm = f"features.norm{len(config.block_config) + 1}."
    twin.load_state_dict(
        {
            key.replace(final_norm, "features.norm5."): value
            for key, value in model.state_dict().items()
        }
    )
    return twin.eval()


def _stock(
    module: nn.Module,
    device: torch.device,
    *,
    precision: Precision,
    channels_last: bool,
    compile: bool,
) -> Callable[[], Callable[[Tensor], Tensor]]:
    """A stock nn.Module run the way PyTorch documents: layout, autocast and compile."""

    def build() -> Callable[[Tensor], Tensor]:
        # A copy: other candidates share ``module`` and must keep their own layout.
        net = copy.deepcopy(module).to(
            device, memory_format=torch.channels_last if channels_last else None
        )
        net = torch.compile(net) if compile else net

        def run(x: Tensor) -> Tensor:
            with autocast(device, precision):
                return net(x)

        return run

    return build


def candidates(
    model: DenseNet, device: torch.device, precisions: list[Precision], compile: bool
) -> list[Candidate]:
    """What `densenet bench` compares: torchvision's model and our plain model run alike, in each
    precision and layout (optionally compiled), then our inference network."""
    twin = torchvision_twin(model)
    found = []
    for precision in precisions:
        for channels_last in (False, True):
            found += _stock_pair(model, twin, device, precision, channels_last, compiled=False)
        if compile:
            found += _stock_pair(model, twin, device, precision, True, compiled=True)
        dtype = DTYPES[precision]
        if onednn_supports(device, dtype):
            # Both convolution backends, to show what oneDNN's reordered weights (and where they
            # build, our C kernels for the dense layers) give on top.
            fast = "C kernels + oneDNN" if native.layer_kernels_available(dtype) else "oneDNN convs"
            for backend, label in (("aten", "aten convs"), ("onednn", fast)):
                found.append(
                    Candidate(
                        f"ours, optimize_for_inference ({label})",
                        precision,
                        _optimized(model, device, dtype, conv_backend=backend),
                        True,
                    )
                )
        else:
            found.append(
                Candidate(
                    "ours, optimize_for_inference",
                    precision,
                    _optimized(model, device, dtype),
                    True,
                )
            )
        if compile:
            found.append(
                Candidate(
                    "ours, optimize_for_inference + compile",
                    precision,
                    _optimized(model, device, dtype, compile=True),
                    True,
                )
            )
    return found


def _stock_pair(
    model: DenseNet,
    twin: nn.Module | None,
    device: torch.device,
    precision: Precision,
    channels_last: bool,
    compiled: bool,
) -> list[Candidate]:
    """torchvision's model (where it can express ours) and our plain model, run the same way."""
    layout = "channels_last" if channels_last else "NCHW"
    how = f"({precision}, {layout}{', compiled' if compiled else ''})"
    pair = [] if twin is None else [("torchvision", twin)]
    pair.append((OURS_PLAIN if not compiled else "ours", model))
    return [
        Candidate(
            f"{name} {how}",
            precision,
            _stock(
                module, device, precision=precision, channels_last=channels_last, compile=compiled
            ),
            channels_last,
        )
        for name, module in pair
    ]


def _optimized(
    model: DenseNet,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile: bool = False,
    conv_backend: str = "auto",
) -> Callable[[], Callable[[Tensor], Tensor]]:
    return lambda: optimize_for_inference(
        copy.deepcopy(model).to(device), dtype=dtype, compile=compile, conv_backend=conv_backend
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(found: list[Candidate], x: Tensor, *, warmup: int, rounds: int) -> list[Timing]:
    """Seconds per call of each candidate on ``x`` in each of ``rounds`` rounds, after ``warmup``
    untimed calls. Every round calls each candidate once, in turn."""
    inputs = {
        layout: x.contiguous(memory_format=torch.channels_last) if layout else x.contiguous()
        for layout in (False, True)
    }
    times: list[list[float]] = [[] for _ in found]
    with torch.inference_mode():
        runs = [candidate.build() for candidate in found]
        for run, candidate in zip(runs, found, strict=True):
            for _ in range(warmup):
                run(inputs[candidate.channels_last])
        _synchronize(x.device)
        for round_index in range(rounds):
            # Each round starts one candidate later: going first (after another's garbage, with
            # the allocator's free lists in another state) measurably costs or gains a few percent.
            for i in rotated(range(len(found)), round_index):
                begin = time.perf_counter()
                runs[i](inputs[found[i].channels_last])
                _synchronize(x.device)
                times[i].append(time.perf_counter() - begin)
    return [
        Timing(candidate.name, candidate.precision, x.shape[0], tuple(spent))
        for candidate, spent in zip(found, times, strict=True)
    ]


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` in the order round ``round_index`` takes them: each round starts one later, so
    that none always goes first."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def machine_kind(device: torch.device) -> str:
    """A short name for the kind of machine, for results file names: avx2, avx512, avx512bf16,
    amx (each a CPU whose oneDNN kernels differ in speed by several times), or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    if has_amx():
        return "amx"
    if fast_bf16(device):
        return "avx512bf16"
    return torch.backends.cpu.get_cpu_capability().lower()


def results_head(title: str, script: str, argv: Sequence[str]) -> list[str]:
    """The first lines of a benchmark script's results file: its title, the command that made it
    and the CPU's description."""
    command = f"python {script} {shlex.join(argv)}".rstrip()
    lines = [f"# {title}", "", f"- command: `{command}`"]
    return lines + [f"- {line}" for line in machine_description(torch.device("cpu"))]


def machine_description(device: torch.device) -> Iterator[str]:
    """The facts a speed result depends on, one line each, for the head of every result file."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        yield f"device: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    info = cpu_info()
    cpu = info.get("model name") or platform.processor() or "unknown CPU"
    # Virtual machines often show a bare "AMD EPYC": the family and model tell its generation
    # (25/17 is Zen 4, 26 is Zen 5), and with it how wide its vector units run.
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']}, model {info['model']})"
    bf16 = "native bf16" if fast_bf16(torch.device("cpu")) else "no native bf16"
    yield (
        f"cpu: {cpu}, kernels {cpu_kernels()}, {bf16} in oneDNN, "
        f"torch threads: {torch.get_num_threads()}"
    )
    yield (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"python {platform.python_version()}"
    )
    kernels = {name: native.layer_kernels_kind(DTYPES[name]) for name in ("fp32", "bf16")}
    yield "densenet's layer kernels: " + ", ".join(
        f"{name} {kind or 'none (oneDNN)'}" for name, kind in kernels.items()
    )
    # Settings that make this CPU run another CPU's code paths (as `make test-kernels` does).
    limits = [f"{name}={os.environ[name]}" for name in CPU_LIMITS if os.environ.get(name)]
    if limits:
        yield f"code paths limited: {', '.join(limits)} (the CPU above runs another CPU's code)"
