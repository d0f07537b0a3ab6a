import copy
import functools
import os
import pickle
import platform
import shutil
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_batchnorm
from densenet import DenseNet, native, optimize_for_inference
from densenet.deploy.optimize import (
    BottleneckLayer,
    ClampedReLU,
    FastDenseBlock,
    FastTransition,
    NativeClampConv1x1,
    NativeClampedReLU,
    NativeDenseBlock,
    NativeMaxPool3x3s2,
    NativePlainDenseBlock,
    onednn_supports,
)
from densenet.hardware import cpu_flags

INF = float("inf")
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
needs_bf16_onednn = pytest.mark.skipif(
    not onednn_supports(torch.device("cpu"), torch.bfloat16), reason="oneDNN without native bf16"
)


def _forget_the_library() -> None:
    native._library.cache_clear()
    native._layer_kernels.cache_clear()


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A kernel cache of the test's own, and the next call building (or failing to) afresh."""
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path))
    _forget_the_library()
    yield tmp_path / "kernels"
    _forget_the_library()


def _block_slice(channels: int = 24, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A channels_last slice of a wider block tensor, as a dense layer reads it, holding
    values on both sides of the bounds, signed zeros, infinities and NaN."""
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(3, 40, 5, 7, generator=generator) * 3
    block.view(-1)[:6] = torch.tensor([float("nan"), INF, -INF, 0.0, -0.0, 1e-40])
    block = block.to(dtype).contiguous(memory_format=torch.channels_last)
    return block[:, :channels]


def _split_over(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Every kernel call split over ``threads`` threads, however small its input."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(native, "PARALLEL_MIN_MULTIPLY_ADDS", 1)


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit for bit: NaN included, with its sign and payload."""
    bits = torch.int16 if actual.dtype == torch.bfloat16 else torch.int32
    return actual.dtype == expected.dtype and torch.equal(actual.view(bits), expected.view(bits))


def _torch_clamp(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, low.to(x.dtype).view(1, -1, 1, 1), high.to(x.dtype).view(1, -1, 1, 1))


def _bounds(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    # As ClampedReLU.from_bn makes them: a lower bound (positive BN scale), an upper bound
    # (negative scale), or both zero (a constant channel).
    generator = torch.Generator().manual_seed(1)
    threshold = torch.randn(channels, generator=generator).to(torch.bfloat16).float()
    kind = torch.arange(channels) % 3
    low = torch.where(kind == 0, threshold, torch.where(kind == 1, -INF, 0.0))
    high = torch.where(kind == 1, threshold, torch.where(kind == 0, INF, 0.0))
    return low, high


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_equals_torch_clamp_bit_for_bit(fresh_build, monkeypatch, threads):
    _split_over(monkeypatch, threads)
    x = _block_slice()
    low, high = _bounds(x.shape[1])
    assert native.available() and native.supports_clamp(x)
    actual = native.clamp_channels(x, low, high)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert _same_bits(actual, _torch_clamp(x, low, high))
    assert len(list(fresh_build.glob("kernels-*.so"))) == 1


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("height, width", [(6, 8), (7, 5)])
def test_the_fused_clamp_and_average_pooling_equal_torch_bit_for_bit(
    fresh_build, monkeypatch, threads, height, width
):
    _split_over(monkeypatch, threads)
    generator = torch.Generator().manual_seed(2)
    block = (torch.randn(3, 40, height, width, generator=generator) * 3).to(torch.bfloat16)
    x = block.contiguous(memory_format=torch.channels_last)[:, :24]
    x[0, :3, 0, 0] = torch.tensor([float("nan"), INF, -INF])
    low, high = _bounds(24)
    assert native.available() and native.supports_clamp(x)
    expected = F.avg_pool2d(_torch_clamp(x, low, high), 2)
    assert _same_bits(native.clamp_avg_pool2(x, low, high), expected)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("height, width", [(8, 10), (7, 9), (1, 2)])
def test_the_max_pooling_equals_torch_bit_for_bit(fresh_build, monkeypatch, dtype, height, width):
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, height, width, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    x[1, :3, 0, 0] = torch.tensor([float("nan"), INF, -INF])
    assert native.available() and native.supports_max_pool(x)
    expected = F.max_pool2d(x, 3, 2, 1)
    actual = native.max_pool_3x3s2(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert _same_bits(actual, expected)
    assert not native.supports_max_pool(x[:, :8])  # only dense channels_last


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_of_either_sign_wins_the_max_pooling(fresh_build, dtype):
    x = torch.randn(1, 40, 6, 6, generator=torch.Generator().manual_seed(4)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    x.view(bits)[0, 3, 3, 3] = -0x40 if dtype == torch.bfloat16 else -0x400000  # in 4 windows
    x[0, 35, 5, 5] = float("nan")
    x[0, 36, 0, 0] = INF
    nan = native.max_pool_3x3s2(x).isnan()
    assert torch.equal(nan, F.max_pool2d(x, 3, 2, 1).isnan()) and int(nan.sum()) == 5


def test_the_clamp_takes_only_evenly_spaced_bf16_pixels():
    x = _block_slice()
    assert native.supports_clamp(x)
    assert not native.supports_clamp(x.float())
    assert not native.supports_clamp(x.contiguous())  # NCHW
    assert not native.supports_clamp(
        x[:, :, 1:]
    )  # rows of the image missing: pixels unevenly spaced
    assert not native.supports_clamp(x[:, :, :, ::2])
    assert not native.supports_clamp(x.clone().requires_grad_())


def _within_rounding(result: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """Float32 arithmetic on terms summing to ``magnitude`` in absolute value, and in bf16 one
    rounding of the result: within a few float32 ulp of the magnitude, plus half a bf16 ulp
    (8 significant bits) of the exact value."""
    bound = 4 * torch.finfo(torch.float32).eps * magnitude
    if result.dtype == torch.bfloat16:
        bound = bound + 0.5 * torch.finfo(torch.bfloat16).eps * exact.abs()
    return bool(((result.double() - exact).abs() <= bound).all())


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_norm_relu_computes_in_float_and_rounds_once(fresh_build, monkeypatch, threads, dtype):
    _split_over(monkeypatch, threads)
    x = _block_slice(dtype=dtype)  # NaN, infinities and signed zeros included
    generator = torch.Generator().manual_seed(6)
    scale, shift = torch.randn(24, generator=generator), torch.randn(24, generator=generator)
    out = torch.empty_like(x)
    assert native.available() and native.supports_norm_relu(x, out)
    assert native.norm_relu(x, scale, shift, out) is out
    channel = (1, -1, 1, 1)
    scaled = x.double() * scale.double().view(channel)
    exact = torch.relu(scaled + shift.double().view(channel))
    finite = exact.isfinite()
    magnitude = scaled.abs() + shift.double().abs().view(channel)
    assert _within_rounding(out[finite], exact[finite], magnitude[finite])
    assert torch.equal(out.double()[~finite].isnan(), exact[~finite].isnan())  # NaN passes
    assert (out.double()[~finite].nan_to_num(0) == exact[~finite].nan_to_num(0)).all()
    assert not native.supports_norm_relu(x, torch.empty_like(x).contiguous())  # NCHW out
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert not native.supports_norm_relu(x, out.to(other))  # mixed dtypes
    assert not native.supports_norm_relu(x.double(), out.double())


def _relu_backward_operands(
    channels: int = 24, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    """Over 256 pixels (more than one of norm_sums' blocks): a dense gradient, x as a channel
    slice of a wider block tensor, a ReLU's output z (positive, +0, -0 and NaN), a mean."""
    generator = torch.Generator().manual_seed(5)

    def channels_last(*shape: int) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator) * 4
        return values.to(dtype).contiguous(memory_format=torch.channels_last)

    grad, x = channels_last(3, channels, 11, 13), channels_last(3, channels + 16, 11, 13)
    z = channels_last(3, channels, 11, 13).relu()
    z[0, :3, 0, 0] = torch.tensor([0.0, -0.0, float("nan")])
    mean = torch.randn(channels, generator=generator)
    return grad, x[:, :channels], z, mean


def _gradient_slice(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The first 24 channels of a block's gradient, shaped as :func:`_relu_backward_operands`."""
    block = torch.randn(3, 40, 11, 13).to(dtype)
    return block.contiguous(memory_format=torch.channels_last)[:, :24]


def _through_relu(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """relu's backward in float64, as threshold_backward(grad, z, 0): NaN z lets grad through."""
    return torch.where(z.double() <= 0, 0.0, grad.double())


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("accumulate", [True, False], ids=["added", "over-grad"])
@pytest.mark.parametrize("through_relu", [False, True], ids=["grad", "through-relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_norm_input_gradient_is_computed_in_float_and_rounded_once(
    fresh_build, monkeypatch, threads, accumulate, through_relu, dtype
):
    # x a channel slice of a block tensor; through_relu: grad is that of the ReLU's output z.
    _split_over(monkeypatch, threads)
    grad, x, z, _ = _relu_backward_operands(dtype=dtype)
    relu_output = z if through_relu else None
    target = _gradient_slice(dtype)
    factors = [torch.randn(24) for _ in range(3)]
    scale_grad, scale_x, shift = (f.double().view(1, -1, 1, 1) for f in factors)
    g = _through_relu(grad, z) if through_relu else grad.double()
    terms = [scale_grad * g, scale_x * x.double(), shift.expand_as(g)]
    if accumulate:  # into a channel slice of a block's gradient
        terms.append(target.double())
    else:  # over the incoming gradient itself
        target = grad
    exact, magnitude = sum(terms), sum(term.abs() for term in terms)
    assert native.available()
    assert native.supports_norm_input_gradient(target, grad, x, relu_output)
    result = native.norm_input_gradient(target, grad, x, *factors, accumulate, relu_output)
    assert result.data_ptr() == target.data_ptr()
    assert _within_rounding(result, exact, magnitude)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("through_relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_norm_sums_match_float64_and_repeat_exactly(
    fresh_build, monkeypatch, threads, through_relu, dtype
):
    _split_over(monkeypatch, threads)
    grad, x, z, mean = _relu_backward_operands(channels=40, dtype=dtype)  # 32 + 8: partial
    relu_output = z if through_relu else None
    g = _through_relu(grad, z) if through_relu else grad.double()
    terms = torch.stack([g, g * (x.double() - mean.double().view(1, -1, 1, 1))])
    exact = terms.sum(dim=(1, 3, 4))
    sums = native.norm_sums(grad, x, mean, relu_output)
    assert sums.dtype == torch.float32 and sums.shape == (2, 40)
    # Float32 sums of 429 terms each: within 1e-5 of the sum of their magnitudes.
    assert ((sums.double() - exact).abs() <= 1e-5 * terms.abs().sum(dim=(1, 3, 4))).all()
    assert torch.equal(native.norm_sums(grad, x, mean, relu_output), sums)


def _relu_recompute_operands(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """:func:`_relu_backward_operands` over 40 channels, x holding NaN, infinities, signed zeros
    and a denormal, and BN factors (scale, shift) under which channel 6 comes out denormal."""
    grad, x, _, mean = _relu_backward_operands(channels=40, dtype=dtype)
    x[0, :6, 0, 0] = torch.tensor([float("nan"), INF, -INF, 0.0, -0.0, 1e-40]).to(dtype)
    generator = torch.Generator().manual_seed(8)
    scale, shift = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    scale[6], shift[6] = 1e-39, 0.0
    return grad, x, mean, scale, shift


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_norm_relu_sums_give_norm_relus_output_and_the_sums_through_it(
    fresh_build, monkeypatch, threads, dtype
):
    # The one pass must compute what norm_relu, then norm_sums over its output, do: bit for bit,
    # the ReLU's zeros (rounded ones included) and NaN alike.
    _split_over(monkeypatch, threads)
    grad, x, mean, scale, shift = _relu_recompute_operands(dtype)
    z = native.norm_relu(x, scale, shift, torch.empty_like(grad))
    assert (z == 0).any() and z.isnan().any() and (z > 0).any()
    out = torch.full_like(grad, 7.0)
    sums = native.norm_relu_sums(grad, x, mean, scale, shift, out)
    assert _same_bits(out, z)
    assert _same_bits(sums, native.norm_sums(grad, x, mean, z))


@needs_compiler
@pytest.mark.parametrize("accumulate", [True, False], ids=["added", "over-grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_norm_input_gradient_recomputes_the_relu_as_norm_relu_computes_it(
    fresh_build, monkeypatch, accumulate, dtype
):
    _split_over(monkeypatch, 2)
    grad, x, _, scale, shift = _relu_recompute_operands(dtype)
    z = native.norm_relu(x, scale, shift, torch.empty_like(grad))
    factors = [torch.randn(40) for _ in range(3)]
    block = torch.randn(3, 56, 11, 13).to(dtype).contiguous(memory_format=torch.channels_last)
    results = []
    for relu in ({"relu_output": z}, {"relu_norm": (scale, shift)}):
        target = block.clone()[:, :40] if accumulate else grad.clone()
        incoming = grad if accumulate else target
        results.append(
            native.norm_input_gradient(target, incoming, x, *factors, accumulate, **relu)
        )
    assert _same_bits(results[1], results[0])


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_norm_stats_match_float64_far_from_zero_and_repeat_exactly(
    fresh_build, monkeypatch, threads, dtype
):
    _split_over(monkeypatch, threads)
    # 429 pixels (more than one summing block) of a 40-channel slice of a wider block tensor,
    # around 1000 with spread 1 in some channels: a one-pass sum of squares would lose the variance.
    generator = torch.Generator().manual_seed(7)
    centres = torch.tensor([1000.0, -1000.0, 0.0, 3.0] * 10).view(1, -1, 1, 1)
    values = torch.randn(3, 40, 11, 13, generator=generator) + centres
    block = torch.cat([values, torch.randn(3, 16, 11, 13)], dim=1).to(dtype)
    x = block.contiguous(memory_format=torch.channels_last)[:, :40]
    assert native.available() and native.supports_norm_stats(x)
    mean, var = native.norm_stats(x)
    exact = x.double()
    exact_mean, exact_var = exact.mean(dim=(0, 2, 3)), exact.var(dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (40,)
    # Float32 sums of 429 values: within 1e-5 of their magnitude for the mean, and of the
    # variance itself for the variance (about the mean, not cancelling against it).
    assert ((mean.double() - exact_mean).abs() <= 1e-5 * exact.abs().mean(dim=(0, 2, 3))).all()
    assert ((var.double() - exact_var).abs() <= 1e-5 * exact_var).all()
    again = native.norm_stats(x)
    assert torch.equal(again[0], mean) and torch.equal(again[1], var)
    assert not native.supports_norm_stats(x.contiguous())  # NCHW
    assert not native.supports_norm_stats(x.double())


def test_the_norm_input_gradient_takes_only_matching_channels_last_tensors():
    grad, x, *_ = _relu_backward_operands()  # x a channel slice, as target
    target = _gradient_slice()
    assert native.supports_norm_input_gradient(target, grad, x)
    dense_target = target.contiguous(memory_format=torch.channels_last)
    assert native.supports_norm_input_gradient(dense_target.float(), grad.float(), x.float())
    assert not native.supports_norm_input_gradient(target, grad.float(), x)  # mixed dtypes
    assert not native.supports_norm_input_gradient(target.float(), grad.float(), x)
    assert not native.supports_norm_input_gradient(target, grad, x, grad.float().relu())
    assert not native.supports_norm_input_gradient(dense_target.double(), grad.double(), x.double())
    assert not native.supports_norm_input_gradient(target, grad.contiguous(), x)  # NCHW
    assert not native.supports_norm_input_gradient(target, grad, x[:, :, :, 1:])
    assert not native.supports_norm_input_gradient(target[:, :, 1:], grad[:, :, 1:], x[:, :, 1:])
    relu_output = grad.relu()
    assert native.supports_norm_input_gradient(target, grad, x, relu_output)
    assert not native.supports_norm_input_gradient(target, grad, x, relu_output.contiguous())


def _tiny_bf16_networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = randomize_batchnorm(
        DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5)
    ).eval()
    return optimize_for_inference(model, dtype=torch.bfloat16), model


@needs_compiler
@needs_bf16_onednn
def test_the_bf16_network_clamps_with_the_kernel_to_the_same_logits(fresh_build):
    network, _ = _tiny_bf16_networks()
    _unfuse(network)  # on AMX the bottleneck clamps run inside their convolutions' kernel
    units = [m for m in network.modules() if isinstance(m, NativeClampedReLU)]
    assert len(units) == 5 + 1 + 1  # a clamp per bottleneck layer, transition and head
    assert any(isinstance(m, NativeMaxPool3x3s2) for m in network.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = network(x)
        for parent in list(network.modules()):
            for name, child in parent.named_children():
                if isinstance(child, NativeClampedReLU):
                    aten = ClampedReLU(child.low.flatten(), child.high.flatten())
                    setattr(
                        parent,
                        name,
                        nn.Sequential(aten, nn.AvgPool2d(2)) if child.avg_pool2 else aten,
                    )
                elif isinstance(child, NativeMaxPool3x3s2):
                    setattr(parent, name, nn.MaxPool2d(3, 2, 1))
        assert torch.equal(fast, network(x))  # the same network with ATen's clamp


@needs_bf16_onednn
def test_without_a_compiler_it_warns_once_and_clamps_with_torch(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.delenv("DENSENET_KERNEL_MARCH", raising=False)
    with pytest.warns(RuntimeWarning, match="could not build its C kernels.*C compiler"):
        network, model = _tiny_bf16_networks()
    assert not any(
        isinstance(m, (NativeClampedReLU, NativeMaxPool3x3s2)) for m in network.modules()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every build
        optimize_for_inference(model, dtype=torch.bfloat16)
    assert not any(fresh_build.glob("*"))  # nothing half-built left behind


@needs_compiler
def test_a_damaged_cached_library_is_built_again(fresh_build):
    assert native.available()
    (library,) = fresh_build.glob("kernels-*.so")
    # A new file, as a copy or a restore would leave; rewriting the one this process has mapped
    # would pull the code from under it.
    library.unlink()
    library.write_bytes(b"not a shared library")
    _forget_the_library()
    assert native.available()
    x = _block_slice()
    low, high = _bounds(x.shape[1])
    assert _same_bits(native.clamp_channels(x, low, high), _torch_clamp(x, low, high))


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_on_one_thread_runs_the_kernel(fresh_build, monkeypatch):
    # A DataLoader worker: forked after the parent ran the kernel on OpenMP's threads, which a
    # fork doesn't copy, it runs on one thread, as PyTorch sets its workers to.
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 1)
    x = _block_slice()
    low, high = _bounds(x.shape[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = native.clamp_channels(x, low, high)
    finally:
        torch.set_num_threads(threads)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: at most 60 s, then the parent's read sees the pipe closed
        signal.alarm(60)
        torch.set_num_threads(1)
        same = _same_bits(native.clamp_channels(x, low, high), expected)
        os.write(writer, b"same" if same else b"differs")
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"same"


def _openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line}


@needs_compiler
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="no /proc/self/maps")
def test_the_kernels_share_pytorchs_openmp_threads(fresh_build):
    before = _openmp_runtimes()  # PyTorch's, and other wheels' copies under names of their own
    if not before:
        pytest.skip("this PyTorch runs without libgomp")
    assert native.available()
    assert _openmp_runtimes() == before  # no second OpenMP runtime with threads of its own


@needs_compiler
def test_without_openmp_the_kernels_build_to_run_on_one_thread(fresh_build, monkeypatch):
    monkeypatch.setattr(native, "OPENMP_FLAGS", ("--no-such-openmp-flag",))
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    x = _block_slice()
    low, high = _bounds(x.shape[1])
    assert _same_bits(native.clamp_channels(x, low, high), _torch_clamp(x, low, high))


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU levels")
def test_the_kernels_build_for_another_cpu_when_asked(fresh_build, monkeypatch):
    monkeypatch.delenv("DENSENET_KERNEL_MARCH", raising=False)
    assert native.available()
    monkeypatch.setenv("DENSENET_KERNEL_MARCH", "x86-64-v2")  # SSE4.2: no AVX, as make test-kernels
    _forget_the_library()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    assert len(list(fresh_build.glob("kernels-*.so"))) == 2  # a build of its own, beside this CPU's
    x = _block_slice()
    low, high = _bounds(x.shape[1])
    assert _same_bits(native.clamp_channels(x, low, high), _torch_clamp(x, low, high))


def _layer_kernels_built(kind: str) -> bool:
    """Whether the library has this kind of layer kernels (whether or not they run by default:
    on AMX CPUs the vdpbf16ps kernels are built too)."""
    if kind == "amx":
        kernels = native._layer_kernels(torch.bfloat16)
        return kernels is not None and kernels[1] == "amx"  # the tiles granted to this process
    return native.available() and hasattr(native._library(), f"conv3x3_{kind}")


# The layer kernels by kind (see native.LAYER_KERNELS) and their dtype, with the CPU each needs.
LAYER_KINDS = {
    "amx": (torch.bfloat16, "AMX"),
    "dpbf16": (torch.bfloat16, "AVX512_BF16"),
    "float": (torch.float32, "AVX-512 or AVX2"),
}


def _layer_params(*kinds: str) -> list:
    return [
        pytest.param(
            kind,
            marks=pytest.mark.skipif(
                not _layer_kernels_built(kind), reason=f"no {LAYER_KINDS[kind][1]} kernels here"
            ),
        )
        for kind in kinds
    ]


LAYER_DTYPES = _layer_params(*LAYER_KINDS)
BF16_LAYER_DTYPES = _layer_params("amx", "dpbf16")


@pytest.fixture
def dtype(request, monkeypatch):
    """The dtype of a kind of layer kernels (a parameter), with that kind running its layers."""
    dtype = LAYER_KINDS[request.param][0]
    monkeypatch.setitem(native.LAYER_KERNELS, dtype, (request.param,))
    native._layer_kernels.cache_clear()
    yield dtype
    native._layer_kernels.cache_clear()


def _close_to_exact(actual: torch.Tensor, exact: torch.Tensor) -> bool:
    """bf16: one rounding (half an ulp, 2**-9 relative) of a float sum (far below that).
    float32: sums of up to 1,152 float32 products (about 1e-6 relative here)."""
    relative = 2**-8 if actual.dtype == torch.bfloat16 else 1e-5
    error = (actual.double() - exact).abs()
    return bool((error <= exact.abs() * relative + 1e-5).all())


def _1x1_weights(
    out_channels: int, in_channels: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 convolution's random weights in ``dtype`` and its float32 bias."""
    weight = (torch.randn(out_channels, in_channels, 1, 1, generator=generator) / 8).to(dtype)
    return weight, torch.randn(out_channels, generator=generator)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_channels, out_channels", [(64, 128), (40, 48)])
def test_the_clamp_and_1x1_convolution_kernel_matches_float64(
    monkeypatch, dtype, threads, in_channels, out_channels
):
    # Channel counts that are and aren't multiples of the 32-wide tiles, and 105 pixels: three
    # full tiles of 32 (nine of 12) and a partial one; the input a slice of a wider block tensor.
    _split_over(monkeypatch, threads)
    generator = torch.Generator().manual_seed(7)
    block = torch.randn(3, in_channels + 8, 5, 7, generator=generator).to(dtype)
    x = block.contiguous(memory_format=torch.channels_last)[:, :in_channels]
    low, high = _bounds(in_channels)
    weight, bias = _1x1_weights(out_channels, in_channels, dtype, generator)
    assert native.supports_layer(x)
    packed = native.pack_weights(weight)
    actual = native.clamp_conv1x1(x, low, high, packed, bias, out_channels)
    assert actual.dtype == dtype and actual.shape == (3, out_channels, 5, 7)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    clamped = _torch_clamp(x, low, high).double()
    exact = F.relu(F.conv2d(clamped, weight.double(), bias.double()))
    assert _close_to_exact(actual, exact)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
def test_the_fused_clamp_lets_nan_of_either_sign_through_and_clamps_infinities(dtype):
    # NaN in a channel with a lower bound, one with an upper bound, and one in the last, partial
    # 32 channels: all its pixel's outputs are NaN, as torch's clamp and convolution make them.
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 40, 5, 7, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    negative_nan = -0x40 if dtype == torch.bfloat16 else -0x400000  # sign and quiet bit set
    x[0, 0, 0, 0] = float("nan")
    x.view(bits)[1, 1, 2, 3] = negative_nan
    x.view(bits)[2, 33, 4, 6] = negative_nan
    x[0, 1, 3, 3], x[0, 3, 3, 4] = INF, -INF  # beyond an upper and a lower bound
    low, high = _bounds(40)
    weight, bias = _1x1_weights(48, 40, dtype, generator)
    actual = native.clamp_conv1x1(x, low, high, native.pack_weights(weight), bias, 48)
    clamped = _torch_clamp(x, low, high).double()
    exact = F.relu(F.conv2d(clamped, weight.double(), bias.double())).permute(0, 2, 3, 1)
    actual = actual.permute(0, 2, 3, 1)
    nan_pixels = x.isnan().any(dim=1)
    assert int(nan_pixels.sum()) == 3 and exact[nan_pixels].isnan().all()
    assert actual[nan_pixels].isnan().all()
    assert _close_to_exact(actual[~nan_pixels], exact[~nan_pixels])


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_transition_kernel_clamps_pools_and_convolves_in_one_pass(monkeypatch, dtype, threads):
    # Odd height and width (the last row and column dropped, as avg_pool2d does), no ReLU, and
    # the input a slice of a wider block tensor.
    _split_over(monkeypatch, threads)
    generator = torch.Generator().manual_seed(11)
    block = torch.randn(3, 72, 9, 7, generator=generator).to(dtype)
    x = block.contiguous(memory_format=torch.channels_last)[:, :64]
    low, high = _bounds(64)
    weight, bias = _1x1_weights(40, 64, dtype, generator)
    packed = native.pack_weights(weight)
    actual = native.clamp_conv1x1(x, low, high, packed, bias, 40, relu=False, avg_pool2=True)
    assert actual.dtype == dtype and actual.shape == (3, 40, 4, 3)
    # The pooled input as ATen makes it: in bf16 the pooling's output is rounded to bf16.
    pooled = F.avg_pool2d(_torch_clamp(x, low, high), 2).double()
    exact = F.conv2d(pooled, weight.double(), bias.double())
    assert bool((exact < 0).any())  # no ReLU
    assert _close_to_exact(actual, exact)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
def test_the_1x1_convolution_kernel_writes_inside_a_zero_border_for_the_3x3(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 5, 7, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    low, high = _bounds(40)
    weight, bias = _1x1_weights(48, 40, dtype, generator)
    packed = native.pack_weights(weight)
    dense = native.clamp_conv1x1(x, low, high, packed, bias, 48)
    bordered = native.clamp_conv1x1(
        x, low, high, packed, bias, 48, bordered=native.bordered_buffer(2, 48, 5, 7, dtype)
    )
    # Spare pixels for the 3x3 kernel's last tiles; on AMX, channels rounded up to the tiles' 32.
    channels = 64 if native._layer_kernels(dtype)[1] == "amx" else 48
    assert bordered.shape == (2 * 7 * 9 + native.BORDERED_SPARE_PIXELS, channels)
    images = bordered[: 2 * 7 * 9].view(2, 7, 9, channels)
    assert _same_bits(images[:, 1:-1, 1:-1, :48], dense.permute(0, 2, 3, 1))
    inside = torch.zeros_like(images, dtype=torch.bool)
    inside[:, 1:-1, 1:-1, :48] = True
    assert not images[~inside].any() and not bordered[2 * 7 * 9 :].any()


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "in_channels, out_channels, height, width",
    [(128, 32, 5, 7), (48, 12, 4, 9), (64, 48, 2, 1), (32, 32, 9, 3)],
)
def test_the_3x3_convolution_kernel_matches_float64_written_into_the_block(
    monkeypatch, dtype, threads, in_channels, out_channels, height, width
):
    # DenseNet-121's shape; channels that aren't multiples of the 32-wide tiles (the input padded
    # in the buffer, the output masked, or split over two passes); images smaller than a tile.
    _split_over(monkeypatch, threads)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, in_channels, height, width, generator=generator).relu().to(dtype)
    weight = (torch.randn(out_channels, in_channels, 3, 3, generator=generator) / 16).to(dtype)
    bordered = native.bordered_buffer(3, in_channels, height, width, dtype)
    images = bordered[: 3 * (height + 2) * (width + 2)].view(3, height + 2, width + 2, -1)
    images[:, 1:-1, 1:-1, :in_channels] = x.permute(0, 2, 3, 1)
    block = torch.full((3, out_channels + 24, height, width), 7.0, dtype=dtype)
    block = block.contiguous(memory_format=torch.channels_last)
    new = block[:, 16 : 16 + out_channels]
    native.conv3x3(bordered, native.pack_weights(weight), new)
    assert _close_to_exact(new, F.conv2d(x.double(), weight.double(), padding=1))
    untouched = torch.cat([block[:, :16], block[:, 16 + out_channels :]], dim=1)
    assert bool((untouched == 7.0).all())


def _tiny_network(dtype: torch.dtype) -> torch.nn.Module:
    model = randomize_batchnorm(
        DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5)
    ).eval()
    return optimize_for_inference(model, dtype=dtype)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_network_runs_its_bottlenecks_and_transitions_through_the_layer_kernels(
    monkeypatch, dtype, threads
):
    _split_over(monkeypatch, threads)
    network = _tiny_network(dtype)
    fused = [m for m in network.modules() if isinstance(m, NativeClampConv1x1)]
    assert len(fused) == 5 + 1  # every bottleneck layer and the transition
    assert sum(isinstance(m, NativeDenseBlock) for m in network.modules()) == 2
    x = torch.randn(2, 3, 64, 64)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        fast = network(x)
        _unfuse(network)  # oneDNN's convolutions (after the clamp kernel in bf16)
        torch.testing.assert_close(fast, network(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
def test_a_block_runs_layers_with_more_channels_than_its_kernels_take_unfused(monkeypatch, dtype):
    network = _tiny_network(dtype)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = network(x)
        monkeypatch.setattr(native, "LAYER_MAX_CHANNELS", 12)  # the later layers of each block
        unfused_late = network(x)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(fast, unfused_late, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", BF16_LAYER_DTYPES, indirect=True)
def test_a_plain_layers_bn_relu_is_written_inside_a_zero_border_for_the_3x3(dtype):
    # A slice of a block tensor holding NaN, infinities and signed zeros; every element of the
    # new buffer written: the inside rounded once from float, the border, the padding channels
    # (on AMX, 24 rounded up to the tiles' 32) and the spare pixels zeros.
    x = _block_slice(24, dtype)
    padded = 32 if native._layer_kernels(dtype)[1] == "amx" else 24
    generator = torch.Generator().manual_seed(9)
    scale, shift = torch.randn(24, generator=generator), torch.randn(24, generator=generator)
    n, _, height, width = x.shape
    shape = (n * (height + 2) * (width + 2) + native.BORDERED_SPARE_PIXELS, padded)
    garbage = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    del garbage  # memory for the new buffer to reuse, NaN where nothing is written
    bordered = native.norm_relu_bordered(x, scale, shift)
    assert bordered.shape == shape
    images = bordered[: n * (height + 2) * (width + 2)].view(n, height + 2, width + 2, padded)
    channel = (1, -1, 1, 1)
    exact = torch.relu(x.double() * scale.double().view(channel) + shift.double().view(channel))
    exact = exact.permute(0, 2, 3, 1)
    inside = images[:, 1:-1, 1:-1, :24].double()
    finite = exact.isfinite()
    ulp = torch.finfo(torch.bfloat16).eps * exact[finite].abs()
    assert ((inside[finite] - exact[finite]).abs() <= 0.5 * ulp + 1e-5).all()
    assert torch.equal(inside[~finite].isnan(), exact[~finite].isnan())  # NaN passes
    written = torch.zeros_like(images, dtype=torch.bool)
    written[:, 1:-1, 1:-1, :24] = True
    assert not images[~written].any() and not bordered[n * (height + 2) * (width + 2) :].any()


def _tiny_plain_network(dtype: torch.dtype) -> torch.nn.Module:
    model = DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=0)
    return optimize_for_inference(randomize_batchnorm(model).eval(), dtype=dtype)


@pytest.mark.parametrize("dtype", BF16_LAYER_DTYPES, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_plain_network_runs_its_blocks_through_the_layer_kernels_in_bf16(
    monkeypatch, dtype, threads
):
    _split_over(monkeypatch, threads)
    network = _tiny_plain_network(dtype)
    assert sum(isinstance(m, NativePlainDenseBlock) for m in network.modules()) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = network(x)
        monkeypatch.setattr(native, "LAYER_MAX_CHANNELS", 12)  # the later layers of each block
        late_layers_unfused = network(x)
        _unfuse(network)  # BN-ReLU and oneDNN's convolutions
        unfused = network(x)
    torch.testing.assert_close(fast, unfused, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(late_layers_unfused, unfused, rtol=2e-2, atol=2e-2)


@needs_compiler
@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="no AVX2 here")
def test_the_avx2_float32_layer_kernels_give_the_bits_of_this_cpus_own(fresh_build, monkeypatch):
    # Most CPUs that run this suite have AVX-512: built for x86-64-v3 the AVX2 kernels run here
    # too. They sum in the same order with the same fused multiply-adds as the AVX-512 ones, so
    # the whole network must agree bit for bit. Bottlenecks of 48 outputs take several passes of
    # 16 (AVX2) or 32 (AVX-512) outputs; 12- and 24-channel inputs end in partial vectors.
    generator = torch.Generator().manual_seed(13)
    model = DenseNet(growth_rate=12, block_config=(2, 3), num_init_features=24, num_classes=5)
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)

    def logits() -> torch.Tensor:
        _forget_the_library()
        network = optimize_for_inference(model, dtype=torch.float32)
        assert any(isinstance(m, NativeDenseBlock) for m in network.modules())
        with torch.no_grad():
            return network(x)

    monkeypatch.setenv("DENSENET_KERNEL_MARCH", "native")  # whatever `make test-kernels` set
    own = logits()
    monkeypatch.setenv("DENSENET_KERNEL_MARCH", "x86-64-v3")
    avx2 = logits()
    assert len(list(fresh_build.glob("kernels-*.so"))) == 2  # two builds, not one cached
    assert _same_bits(avx2, own)
    with torch.no_grad():
        torch.testing.assert_close(avx2, model(x), rtol=1e-4, atol=1e-4)


def test_plain_float32_blocks_stay_with_onednn():
    # Its float32 3x3 convolution with k = 12 outputs ran twice as fast as the AVX-512 kernel.
    network = _tiny_plain_network(torch.float32)
    assert not any(isinstance(m, NativePlainDenseBlock) for m in network.modules())


def _unfuse(network: torch.nn.Module) -> None:
    for module in network.modules():
        if isinstance(module, NativeDenseBlock | NativePlainDenseBlock):
            module.forward = functools.partial(FastDenseBlock.forward, module)
        elif isinstance(module, BottleneckLayer) and isinstance(module.conv1, NativeClampConv1x1):
            module.act, module.conv1 = module.conv1.unfused, module.conv1.conv
        elif isinstance(module, FastTransition) and isinstance(module.conv, NativeClampConv1x1):
            module.act, module.conv = module.conv.unfused, module.conv.conv


@needs_compiler
def test_a_cpu_level_the_compiler_doesnt_know_is_named_in_the_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("DENSENET_KERNEL_MARCH", "no-such-cpu")
    with pytest.warns(RuntimeWarning, match=r"no-such-cpu.*DENSENET_KERNEL_MARCH"):
        assert not native.available()


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
def test_a_copied_network_runs_its_blocks_on_its_own_weights(dtype):
    # A block hands its weights' addresses to C: a copy must take its own, not the original's.
    network = _tiny_network(dtype)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = network(x)
        clones = [copy.deepcopy(network), pickle.loads(pickle.dumps(network))]
        for module in network.modules():
            if isinstance(module, NativeDenseBlock):
                for weights in module.weights:
                    weights.packed_3x3.zero_()  # the original's weights, not the copies'
        assert not torch.equal(network(x), expected)
        for clone in clones:
            assert torch.equal(clone(x), expected)


@pytest.mark.parametrize("dtype", LAYER_DTYPES, indirect=True)
def test_weights_packed_for_other_layer_kernels_never_reach_these(monkeypatch, dtype):
    # A network built where one kind of kernels ran (AMX's tiles, say) and unpickled where another
    # runs (AVX512_BF16's): its weights are laid out for the first, so it runs without them.
    network = _tiny_network(dtype)
    x = torch.randn(2, 3, 64, 64)

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights packed for other kernels were handed to these")

    with torch.no_grad():
        expected = network(x)
        monkeypatch.setattr(native, "layer_kernels_kind", lambda dtype: "other")
        for name in ("dense_block", "clamp_conv1x1", "conv3x3"):
            monkeypatch.setattr(native, name, must_not_run)
        elsewhere = network(x)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(elsewhere, expected, rtol=tolerance, atol=tolerance)
