import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from architectures import short_bc
from densenet.models.batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from densenet.training.distributed import broadcast_buffers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank, world_size, port, x, g, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        bn = SyncBatchNorm2d(x.shape[1])
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        part = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        xr = x[part].clone().requires_grad_(True)
        for _ in range(2):  # two steps: running statistics accumulate
            out = bn(xr)
        (out * g[part]).sum().backward()
        grads = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)
        # Plain BatchNorm learns each process's own statistics, until they are made process 0's.
        plain = nn.BatchNorm2d(x.shape[1])
        plain(x[part])
        broadcast_buffers(plain)
        results[rank] = (
            out.detach(),
            xr.grad,
            grads,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            plain.state_dict(),
        )
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_over_two_processes_equals_one_big_batch():
    x = torch.randn(8, 5, 4, 3) * 3 + 1
    g = torch.randn(8, 5, 4, 3)
    results = mp.Manager().dict()
    mp.spawn(_sync_bn_worker, args=(2, free_port(), x, g, results), nprocs=2)

    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    xf = x.clone().requires_grad_(True)
    for _ in range(2):
        out = reference(xf)
    (out * g).sum().backward()

    halves = [results[0], results[1]]
    assert torch.allclose(torch.cat([h[0] for h in halves]), out, atol=1e-5)
    assert torch.allclose(torch.cat([h[1] for h in halves]), xf.grad, atol=1e-5)
    for h in halves:
        assert torch.allclose(
            h[2], torch.stack([reference.weight.grad, reference.bias.grad]), atol=1e-4
        )
        assert torch.allclose(h[3], reference.running_mean, atol=1e-6)
        assert torch.allclose(h[4], reference.running_var, atol=1e-5)
    first_half = nn.BatchNorm2d(5)
    first_half(x[:4])
    for h in halves:
        assert all(torch.equal(h[5][k], v) for k, v in first_half.state_dict().items())


def test_without_a_process_group_it_is_plain_batchnorm():
    model = short_bc()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    converted = convert_sync_batchnorm(model)
    assert all(type(m) is not nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in converted.modules()) > 0
    assert set(converted.state_dict()) == set(short_bc().state_dict())
    assert torch.allclose(converted(x), expected, atol=1e-6)
