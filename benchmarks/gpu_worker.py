"""The measuring side of benchmarks/gpu_check.py: one process runs a list of configurations.

    python benchmarks/gpu_worker.py JOB_JSON

For each configuration it prints ``{"start": name}``, a ``{"result": {...}}`` per measurement and
``{"done": name}``, one JSON object a line, so that gpu_check.py knows which configuration a
process was in when it had to end it (a compilation past its time cap) and can go on with the rest.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from densenet import create_model, optimize_for_inference

CLASSES = {"densenet121": 1000, "bc250": 10}
# The suite's bound for the same comparison (tests/models/test_efficient.py, MAX_ERROR_RATIO):
# the memory-efficient path may round at most 1.5x as much as the standard one. At the sizes of the
# real run, 3-seed averages on a 2-core AVX2 CPU were 1.05-1.26 (bf16 running statistics highest).
MAX_ERROR_RATIO = 1.5


def build(model: str, impl: str, arch: dict) -> nn.Module:
    """``impl`` of ``model``: ours, tv (torchvision) or timm, -me for memory_efficient=True.

    ``arch`` overrides the architecture (a tiny network in a dry run); without it each library
    builds its own densenet121.
    """
    me = impl.endswith("-me")
    if impl.startswith("ours"):
        preset = "densenet121" if model == "densenet121" else "densenet_bc100_k12"
        return create_model(preset, memory_efficient=me, **arch)
    if impl.startswith("tv"):
        if not arch:
            return torchvision.models.densenet121(memory_efficient=me)
        return torchvision.models.DenseNet(**arch, memory_efficient=me)
    import timm  # here: it takes a second to import and few configurations need it

    # timm derives the stem's width from the growth rate (2k, as in DenseNet-121).
    return timm.create_model(
        "densenet121", **{k: arch[k] for k in arch if k != "num_init_features"}
    )


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int, windows: int):
    """Median over ``windows`` of the time per call of ``calls`` back-to-back calls.

    On CUDA, events on the stream time what the GPU did from the first call's start to the last
    one's end, idle gaps included, with no synchronisation inside the window.
    """
    spans = []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            spans.append(start.elapsed_time(end) / 1000 / calls)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            spans.append((time.perf_counter() - begin) / calls)
    return statistics.median(spans)


def timed_once(fn: Callable[[], object], device: torch.device) -> float:
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def bf16(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def batch_of(config: dict, device: torch.device, batch: int | None = None) -> Tensor:
    size = config["size"]
    x = torch.randn(batch or config["batch"], 3, size, size, device=device)
    return x.contiguous(memory_format=torch.channels_last)


def train_speed(config: dict, job: dict) -> Iterator[dict]:
    """Training img/s (SGD steps, bf16 autocast, channels_last) and peak memory of one model."""
    device = torch.device(job["device"])
    held_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = build(config["model"], config["impl"], config["arch"])
    model = model.train().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model) if config["compile"] and job["compile"] else model
    x = batch_of(config, device)
    y = torch.randint(0, CLASSES[config["model"]], (len(x),), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with bf16(device):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()

    first = timed_once(step, device)  # compiles, and lets cuDNN choose its algorithms
    step()
    if job["warm_only"]:
        yield {"first_call_s": first}
        return
    if device.type == "cuda":
        # The peak of steady steps (parameters, optimizer state, activations and gradients), not
        # that of compilation or of cuDNN's trials.
        torch.cuda.reset_peak_memory_stats(device)
    per_step = seconds_per_call(step, device, config["steps"], config["windows"])
    record = {"img_per_s": len(x) / per_step, "first_call_s": first}
    if device.type == "cuda":
        record["peak_gb"] = (torch.cuda.max_memory_allocated(device) - held_before) / 1e9
    yield record


def inference_speed(config: dict, job: dict) -> Iterator[dict]:
    """Inference img/s at each batch size, one (compiled) callable for all of them."""
    device = torch.device(job["device"])
    impl, compiled = config["impl"], config["compile"] and job["compile"]
    model = build("densenet121", "ours" if impl == "ours-ofi" else impl, config["arch"])
    model = model.eval().to(device)
    if impl == "ours-ofi":
        run = optimize_for_inference(model, dtype=torch.bfloat16, compile=compiled)
    else:
        net = model.to(memory_format=torch.channels_last)
        net = torch.compile(net) if compiled else net

        def run(x: Tensor) -> Tensor:
            with bf16(device):
                return net(x)

    with torch.inference_mode():
        for batch, calls in zip(config["batches"], config["calls"], strict=True):
            x = batch_of(config, device, batch)
            first = timed_once(lambda x=x: run(x), device)
            run(x)
            if job["warm_only"]:
                yield {"batch": batch, "first_call_s": first}
                continue
            per_call = seconds_per_call(lambda x=x: run(x), device, calls, config["windows"])
            yield {"batch": batch, "img_per_s": batch / per_call, "first_call_s": first}


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine terms, so that a wrong one cannot go unnoticed."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def _one_step(model: nn.Module, x: Tensor, weights: Tensor, reduced: bool) -> dict[str, Tensor]:
    x = x.clone().requires_grad_()
    with bf16(x.device, enabled=reduced):
        out = model(x)
    (out.double() * weights).sum().backward()
    flat = lambda tensors: torch.cat([t.detach().double().flatten() for t in tensors])  # noqa: E731
    return {
        "output": out.detach().double(),
        "input gradient": x.grad.double(),
        "parameter gradients": flat(p.grad for p in model.parameters()),
        "running statistics": flat(b for n, b in model.named_buffers() if "running" in n),
    }


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    # float32 means float32: TF32 would round both paths' convolutions and products far more.
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def equivalence(config: dict, job: dict) -> Iterator[dict]:
    """Each path's error against float64 after one training step, averaged over seeds.

    One step is far from float64 even in float32 at this depth (BN's backward amplifies rounding:
    the gradients of DenseNet-121 at batch 16, 64 px were 5e-3 off on a CPU, in either path), so
    the memory-efficient path is held to the standard path's own error, not to a fixed tolerance.
    """
    device = torch.device(job["device"])
    model, batch = config["model"], config["batch"]
    for precision in ("fp32", "bf16"):
        errors: dict[str, list[list[float]]] = {}
        for seed in range(config["seeds"]):
            torch.manual_seed(seed)
            standard = build(model, "ours", config["arch"])
            _randomize_batchnorm(standard, torch.Generator().manual_seed(seed))
            efficient = build(model, "ours-me", config["arch"])
            efficient.load_state_dict(standard.state_dict())
            reference = copy.deepcopy(standard).double().to(device).train()
            x = batch_of(config, device)
            weights = torch.randn(batch, CLASSES[model], device=device, dtype=torch.float64)
            expected = _one_step(reference, x.double(), weights, False)
            # The layouts `densenet train` uses on a GPU with each precision.
            layout = torch.channels_last if precision == "bf16" else torch.contiguous_format
            x = x.contiguous(memory_format=layout)
            with _no_tf32():
                steps = [
                    _one_step(
                        m.to(device, memory_format=layout).train(), x, weights, precision == "bf16"
                    )
                    for m in (standard, efficient)
                ]
            for key, value in expected.items():
                norm = value.norm().item()
                pair = [(step[key] - value).norm().item() / norm for step in steps]
                errors.setdefault(key, []).append(pair)
        means = {k: [statistics.fmean(c) for c in zip(*v, strict=True)] for k, v in errors.items()}
        ratios = {key: efficient / standard for key, (standard, efficient) in means.items()}
        worst = max(ratios, key=ratios.__getitem__)
        yield {
            "precision": precision,
            "ok": all(ratio <= MAX_ERROR_RATIO for ratio in ratios.values()),
            "worst": worst,
            "worst_ratio": ratios[worst],
            "errors": {key: f"{std:.1e} / {eff:.1e}" for key, (std, eff) in means.items()},
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_step(config: dict, job: dict) -> Iterator[dict]:
    """Two DDP steps of the memory-efficient model (NCCL on CUDA, gloo on CPU), world size 1.

    With one process DDP still buckets the gradients and all-reduces them through the backend,
    and the updates must be those of the same model trained without DDP.
    """
    device = torch.device(job["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    address = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(backend, init_method=address, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = build(config["model"], "ours-me", config["arch"])
        plain = plain.train().to(device, memory_format=torch.channels_last)
        start = copy.deepcopy(plain.state_dict())
        wrapped = copy.deepcopy(plain)
        ids = [device.index or 0] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        x = batch_of(config, device)
        y = torch.randint(0, CLASSES[config["model"]], (len(x),), device=device)
        # Deterministic kernels, so that the two runs add in the same order.
        with torch.backends.cudnn.flags(enabled=True, deterministic=True):
            for net, module in ((plain, plain), (ddp, wrapped)):
                optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
                for _ in range(2):
                    optimizer.zero_grad(set_to_none=True)
                    with bf16(device):
                        loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    optimizer.step()
        updates = [
            torch.cat([(v - start[k]).double().flatten() for k, v in m.state_dict().items()])
            for m in (plain, wrapped)
        ]
        difference = ((updates[1] - updates[0]).norm() / updates[0].norm()).item()
        yield {"backend": backend, "loss": loss.item(), "update_difference": difference}
    finally:
        dist.destroy_process_group()


KINDS = {
    "train": train_speed,
    "infer": inference_speed,
    "equivalence": equivalence,
    "ddp": ddp_step,
}


def emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def main(job: dict) -> None:
    for config in job["configs"]:
        emit({"start": config["name"]})
        torch.backends.cudnn.benchmark = config["kind"] in ("train", "infer")
        try:
            for record in KINDS[config["kind"]](config, job):
                emit({"result": {"name": config["name"], **record}})
        except Exception as error:  # this configuration's result; the next one runs
            emit({"result": {"name": config["name"], "error": one_line(error)}})
        finally:
            # Each configuration starts from an empty cache, and with its own compilations.
            gc.collect()
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        emit({"done": config["name"]})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
