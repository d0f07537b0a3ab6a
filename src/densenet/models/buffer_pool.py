"""Large CPU buffers that memory-efficient training takes again in the next step.

glibc's malloc gives every block above its mmap threshold (at most 32 MiB) back to the system when
it is freed, and the next step maps it again: the kernel zeroes each new page. For DenseNet-121 at
batch 32, 224 px, bf16 that was about 1 GB faulted in per training step, a fifth of the step's time
on a 2-vCPU virtual machine. A :class:`BufferPool` keeps such buffers and hands one out again once
nothing but the pool holds it. CUDA's caching allocator already does this on GPUs: the pool only
serves CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Below this glibc's heap keeps freed memory for reuse anyway.
MIN_BYTES = 16 * 2**20
# A buffer serves requests down to half its size: a smaller one would hold memory it does not use.
_MAX_SLACK = 2

# The number of references to a storage; private, so looked up, and without it nothing is pooled.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(storage: torch.UntypedStorage) -> int:
    """How many tensors (or other owners) hold ``storage``'s memory, not counting ``storage``
    itself, the object made to ask."""
    assert _storage_use_count is not None
    return _storage_use_count(storage._cdata) - 1


@dataclass
class _Buffer:
    memory: Tensor  # uint8
    taken_this_step: bool = True

    @property
    def free(self) -> bool:
        """Whether nothing but the pool holds this memory."""
        return _holders(self.memory.untyped_storage()) == 1


class BufferPool:
    """CPU buffers of at least :data:`MIN_BYTES` kept from one training step for the next.

    A buffer is handed out again only when nothing else holds its memory: no tensor made from it
    is alive (autograd has freed what it saved, no caller keeps an output or a view of it). Each
    :meth:`next_step` lets go of the buffers the previous step did not use (after a change of
    input size, say); :meth:`release` of all free ones. Copies and pickles start empty.
    """

    def __init__(self) -> None:
        self._buffers: list[_Buffer] = []

    def empty(
        self,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        """Like ``torch.empty``: the tensor's content is undefined."""
        like = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format)
        if self._pooled(like, device):
            return self._take(like, device)
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)

    def empty_like(self, tensor: Tensor) -> Tensor:
        """Like ``torch.empty_like`` (same shape, dtype and strides, dense)."""
        like = torch.empty_like(tensor, device="meta")
        if self._pooled(like, tensor.device):
            return self._take(like, tensor.device)
        return torch.empty_like(tensor)

    def held_only_by(self, tensor: Tensor) -> bool:
        """Whether nothing but ``tensor`` (and this pool, if the memory is the pool's) holds
        ``tensor``'s memory: writing it changes no other tensor."""
        if _storage_use_count is None:
            return False
        storage = tensor.untyped_storage()
        return _holders(storage) == 1 + self._owns(storage)

    def _owns(self, storage: torch.UntypedStorage) -> bool:
        return any(buffer.memory.data_ptr() == storage.data_ptr() for buffer in self._buffers)

    def next_step(self) -> None:
        """Forget the buffers the step that ends did not take (those still held are kept)."""
        self._buffers = [
            buffer for buffer in self._buffers if buffer.taken_this_step or not buffer.free
        ]
        for buffer in self._buffers:
            buffer.taken_this_step = False

    def release(self) -> None:
        """Let go of every buffer nothing else holds."""
        self._buffers = [buffer for buffer in self._buffers if not buffer.free]

    @property
    def nbytes(self) -> int:
        """The memory the pool holds, handed out or free."""
        return sum(buffer.memory.numel() for buffer in self._buffers)

    def _pooled(self, like: Tensor, device: torch.device) -> bool:
        return (
            device.type == "cpu" and _storage_use_count is not None and _nbytes(like) >= MIN_BYTES
        )

    def _take(self, like: Tensor, device: torch.device) -> Tensor:
        nbytes = _nbytes(like)
        fitting = [
            buffer
            for buffer in self._buffers
            if nbytes <= buffer.memory.numel() <= _MAX_SLACK * nbytes and buffer.free
        ]
        if fitting:
            buffer = min(fitting, key=lambda buffer: buffer.memory.numel())
            buffer.taken_this_step = True
        else:
            buffer = _Buffer(torch.empty(nbytes, dtype=torch.uint8, device=device))
            self._buffers.append(buffer)
        # A tensor on the buffer's storage, not a view of it: a view would hold a reference to
        # the intermediate views it was made from.
        tensor = torch.empty(0, dtype=like.dtype, device=device)
        return tensor.set_(buffer.memory.untyped_storage(), 0, like.shape, like.stride())

    def __reduce__(self):
        # Copied (copy.deepcopy, e.g. for an EMA model) or pickled: a new, empty pool.
        return type(self), ()


def _nbytes(like: Tensor) -> int:
    return math.prod(like.shape) * like.element_size()
