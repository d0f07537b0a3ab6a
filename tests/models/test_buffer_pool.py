"""The buffer pool hands memory out again only when nothing else holds it."""

import copy
import pickle

import pytest
import torch

from densenet.models import buffer_pool
from densenet.models.buffer_pool import BufferPool

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def pool_everything(monkeypatch):
    monkeypatch.setattr(buffer_pool, "MIN_BYTES", 0)


def address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tensors_have_the_shape_dtype_and_strides_of_torch_empty(layout):
    pool = BufferPool()
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        tensor = pool.empty((2, 3, 4, 5), dtype, CPU, layout)
        expected = torch.empty((2, 3, 4, 5), dtype=dtype, memory_format=layout)
        assert (tensor.shape, tensor.dtype, tensor.stride()) == (
            expected.shape, expected.dtype, expected.stride()
        )  # fmt: skip
        like = pool.empty_like(expected)
        assert (like.shape, like.dtype, like.stride()) == (
            expected.shape, expected.dtype, expected.stride()
        )  # fmt: skip
        tensor.fill_(1)  # writable, every element
        assert tensor.sum() == tensor.numel()


def test_freed_memory_is_handed_out_again():
    pool = BufferPool()
    first = pool.empty((1000,), torch.float32, CPU)
    memory = address(first)
    del first
    second = pool.empty((600,), torch.float32, CPU)  # fits: more than half the buffer
    assert address(second) == memory
    assert pool.nbytes == 4000


def test_memory_still_held_is_never_handed_out():
    pool = BufferPool()
    tensor = pool.empty((1000,), torch.float32, CPU)
    view = tensor[10:20]
    memory = address(tensor)
    del tensor
    assert address(pool.empty((1000,), torch.float32, CPU)) != memory  # the view holds it
    saved = []
    x = pool.empty((1000,), torch.float32, CPU).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = x.sin()
    del x, view
    assert address(pool.empty((1000,), torch.float32, CPU)) not in {
        address(t) for t in saved
    }  # autograd holds the input it saved
    assert y.grad_fn is not None


def test_a_buffer_serves_no_request_under_half_its_size():
    pool = BufferPool()
    big = pool.empty((1000,), torch.float32, CPU)
    memory = address(big)
    del big
    small = pool.empty((400,), torch.float32, CPU)
    assert address(small) != memory
    assert pool.nbytes == 4000 + 1600


def test_the_smallest_free_buffer_that_fits_is_taken():
    pool = BufferPool()
    large, small = pool.empty((1800,), torch.uint8, CPU), pool.empty((1000,), torch.uint8, CPU)
    small_memory = address(small)
    del large, small
    assert address(pool.empty((950,), torch.uint8, CPU)) == small_memory


def test_next_step_forgets_buffers_the_last_step_did_not_take():
    pool = BufferPool()
    kept, unused, held = (pool.empty((n,), torch.uint8, CPU) for n in (100, 1000, 10000))
    del kept, unused
    pool.next_step()
    kept = pool.empty((100,), torch.uint8, CPU)
    del kept
    pool.next_step()  # the 1000-byte buffer went unused for a step; the held one stays
    assert pool.nbytes == 100 + 10000
    assert held.numel() == 10000


def test_release_keeps_only_held_buffers():
    pool = BufferPool()
    held = pool.empty((100,), torch.uint8, CPU)
    pool.empty((1000,), torch.uint8, CPU)
    pool.release()
    assert pool.nbytes == 100
    del held
    pool.release()
    assert pool.nbytes == 0


def test_small_and_non_cpu_tensors_are_not_pooled(monkeypatch):
    monkeypatch.setattr(buffer_pool, "MIN_BYTES", 1024)
    pool = BufferPool()
    pool.empty((255,), torch.float32, CPU)
    pool.empty((1000,), torch.float32, torch.device("meta"))
    assert pool.nbytes == 0
    pool.empty((256,), torch.float32, CPU)
    assert pool.nbytes == 1024


def test_copies_and_pickles_start_empty():
    pool = BufferPool()
    pool.empty((1000,), torch.uint8, CPU)
    owner = {"a": pool, "b": pool}
    copied = copy.deepcopy(owner)
    assert copied["a"] is copied["b"]  # still one pool for both
    assert copied["a"].nbytes == 0
    assert pickle.loads(pickle.dumps(pool)).nbytes == 0


def test_held_only_by_sees_every_other_reference():
    pool = BufferPool()
    for tensor in (pool.empty((1000,), torch.float32, CPU), torch.empty(1000)):
        assert pool.held_only_by(tensor)
        view = tensor[:10]
        assert not pool.held_only_by(tensor)
        del view
        assert pool.held_only_by(tensor)
