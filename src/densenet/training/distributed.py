"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, NCCL on CUDA).

Batch norm across processes lives with the models (``densenet.models.batchnorm``); this module
starts, joins and ends the process group and keeps the processes in step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from densenet.data.loaders import Shard
from densenet.errors import DenseNetError


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints, so a run's outputs exist once."""
        return self.rank == 0

    @property
    def data_shard(self) -> Shard:
        """The part of every batch this process loads."""
        return Shard(self.rank, self.world_size)


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if there is one.

    A torchrun launch of one process starts its group too, so it uses (and proves) the same
    backend as a larger launch.
    """
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:  # not started by torchrun
        return DistributedContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            # NCCL binds each process to the GPU current when the group starts: one GPU per rank.
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # A finite timeout turns a rank that died mid-collective into an error instead of a hang.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return current_context()


def current_context() -> DistributedContext:
    """This process's place in the running process group; a lone process without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistributedContext]:
    """:func:`init_distributed` for the duration of a command, leaving the group on the way out."""
    started_here = not dist.is_initialized()
    context = init_distributed(device)
    try:
        yield context
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def rank_device(device: torch.device, context: DistributedContext) -> torch.device:
    """The device this process computes on: with several processes, GPU ``local_rank``."""
    if device.type != "cuda" or not context.enabled:
        return device
    return torch.device("cuda", context.local_rank)


def data_parallel(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``model`` wrapped to average gradients over all processes; unchanged in a lone process."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[object]:
    """Where a forward and backward pass of ``model`` runs: with DistributedDataParallel and not
    ``sync``, inside its ``no_sync``, which leaves the gradients this process's own."""
    # torch.compile wraps the DDP module; its no_sync is the one whose flag the hooks read.
    wrapped = getattr(model, "_orig_mod", model)
    if sync or not isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def average_gradients(model: nn.Module) -> None:
    """Average the parameters' gradients over all processes, in place, as DistributedDataParallel
    does in a backward pass; a no-op without a process group."""
    if not dist.is_initialized():
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def from_main(value: object) -> object:
    """The main process's ``value`` (any picklable object), on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all processes, in place; unchanged without a process group."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every process's rows of ``tensor`` (N_rank, ...) stacked in rank order; unchanged without
    a process group. Ranks may hold different numbers of rows (the last evaluation batch splits
    unevenly, unreadable images are left out): all_gather needs equal shapes, so each pads to the
    largest count and the padding is cut off again."""
    if not dist.is_initialized():
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(counts))
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)])


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every process; a no-op without a process group."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def stopped_with_others(rank: int) -> str:
    """What a process other than the main one says when a failure stops them all."""
    return f"process {rank} stopped with the others; process 0 says why"


@contextlib.contextmanager
def stop_together(device: torch.device) -> Iterator[None]:
    """Run a block that may fail on some processes only; if it fails on any, all of them raise.

    A file missing on one node, or an output directory only the main process checks, fails one
    process; the others would wait for it in their next collective until the group's timeout.
    Here the processes compare notes once the block is done: the main process raises the first
    failure's error (naming the process it came from when that is not itself), the others say
    that it does, so the cause is printed once. Only :class:`DenseNetError` is caught: anything
    else is a crash, which ``torchrun`` answers by ending the other processes.
    """
    error: DenseNetError | None = None
    try:
        yield
    except DenseNetError as caught:
        if not dist.is_initialized():
            raise
        error = caught
    if all_ranks_agree(error is None, device):
        return
    failures: list[tuple[type[DenseNetError], str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else (type(error), str(error)))
    source, (kind, message) = next((r, f) for r, f in enumerate(failures) if f is not None)
    rank = dist.get_rank()
    if rank != 0:
        raise kind(stopped_with_others(rank))
    if error is not None:  # then the first failure is the main process's own
        raise error
    raise kind(f"process {source}: {message}")


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    Without SyncBatchNorm each process updates its running statistics from its own slice of the
    batch. DistributedDataParallel copies process 0's to the others at the start of each training
    forward, but not before an evaluation: without this, each process would evaluate its own
    variant of the model instead of the weights process 0 saves.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
