import copy
import os
import pickle

import pytest
import torch
from torch import nn

from conftest import randomize_batchnorm
from densenet import ConfigError, DenseNet, create_model, optimize_for_inference
from densenet.deploy import optimize
from densenet.deploy.optimize import (
    BatchNormReLU,
    ClampedReLU,
    Conv2dReLU,
    FastDenseBlock,
    InferenceDenseNet,
    NativeClampConv1x1,
    OneDNNConv2dReLU,
    onednn_supports,
)

TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5)
CONFIGS = {
    "bc-imagenet": dict(TINY),
    "bc-imagenet-3-blocks": dict(TINY, block_config=(1, 2, 2)),
    "plain-c1-cifar": dict(TINY, bn_size=0, compression=1.0, stem="cifar"),
    "bottleneck-c1-cifar": dict(TINY, compression=1.0, stem="cifar"),
    "plain-c0.5-imagenet": dict(TINY, bn_size=0, compression=0.5),
    "one-block-no-head": dict(TINY, block_config=(3,), num_classes=0, stem="cifar"),
}
HAS_ONEDNN = onednn_supports(torch.device("cpu"), torch.float32)
BACKENDS = [
    "aten",
    pytest.param(
        "onednn", marks=pytest.mark.skipif(not HAS_ONEDNN, reason="PyTorch built without oneDNN")
    ),
]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    ),
]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _model(fields: dict, device: str = "cpu") -> DenseNet:
    return randomize_batchnorm(DenseNet(**fields)).eval().to(device)


def _reference(model: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """The eager model's logits in float64, the yardstick for both precisions."""
    with torch.no_grad():
        expected = model.double()(x.double())
    model.float()
    return expected


@pytest.fixture(autouse=True)
def _no_tf32():
    # cuDNN and cuBLAS round fp32 convolutions and matrix products to TF32 (10-bit mantissas) by
    # default on Ampere and later; the 1e-5 comparisons here are about the rewrite, not that.
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_computes_the_same_function(name, device, backend):
    if device == "cuda" and backend == "onednn":
        pytest.skip("oneDNN convolutions are CPU-only")
    model = _model(CONFIGS[name], device)
    # Odd sizes: pooling floors, so the commuted transition must drop the same rows.
    x = torch.randn(3, 3, 37, 41, device=device)
    expected = _reference(model, x)
    with torch.no_grad():
        actual = optimize_for_inference(model, conv_backend=backend)(x)
    assert actual.dtype == torch.float32
    assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("name", ["bc-imagenet-3-blocks", "plain-c1-cifar", "one-block-no-head"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_images_run_in_chunks_compute_the_same_function(monkeypatch, name, backend):
    # A chunk size below one image's block tensor: every group runs image by image.
    monkeypatch.setattr(optimize, "CHUNK_BYTES", 1)
    model = _model(CONFIGS[name])
    x = torch.randn(3, 3, 37, 41)
    expected = _reference(model, x)
    network = optimize_for_inference(model, conv_backend=backend)
    batches = []
    for module in network.modules():
        if isinstance(module, FastDenseBlock):
            module.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    with torch.no_grad():
        actual = network(x)
    assert batches == [1] * 3 * len(CONFIGS[name]["block_config"])
    assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stem_pool_of_other_settings_is_kept_as_it_is(backend):
    # Rounding up at the borders: not the C kernel's case, nor nn.MaxPool2d's default.
    model = _model(CONFIGS["bc-imagenet"])
    model.features.pool0 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    x = torch.randn(2, 3, 36, 40)  # an even stem output, where ceil_mode adds a row and a column
    expected = _reference(model, x)
    with torch.no_grad():
        actual = optimize_for_inference(model, conv_backend=backend)(x)
    assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("name", ["bc-imagenet", "bottleneck-c1-cifar", "one-block-no-head"])
def test_unfolded_input_bn_computes_the_same_function(name):
    # The int8 path keeps BN-ReLU in front of each 1x1 convolution instead of folding it.
    model = _model(CONFIGS[name])
    x = torch.randn(3, 3, 37, 41)
    expected = _reference(model, x)
    with torch.no_grad():
        network = InferenceDenseNet(model, torch.float32, onednn=False, fold_input_bn=False)
        actual = network.eval()(x)
    assert any(isinstance(m, BatchNormReLU) for m in network.modules())
    assert not any(isinstance(m, ClampedReLU) for m in network.modules())
    assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.skipif(not HAS_ONEDNN, reason="PyTorch built without oneDNN")
def test_onednn_is_the_cpu_default_and_aten_otherwise():
    def conv_types(network: nn.Module) -> set[type]:
        return {type(m) for m in network.modules() if "Conv" in type(m).__name__}

    model = _model(TINY)
    # Where the C kernels run (AVX-512, AMX), they wrap oneDNN convolutions for other inputs.
    onednn = conv_types(optimize_for_inference(model)) - {NativeClampConv1x1}
    assert onednn == {OneDNNConv2dReLU}
    aten = {Conv2dReLU, nn.Conv2d}
    assert conv_types(optimize_for_inference(model, conv_backend="aten")) == aten
    # compile traces plain convolutions; inspect the module it wraps
    assert conv_types(optimize_for_inference(model, compile=True)._orig_mod) == aten


@pytest.mark.skipif(not HAS_ONEDNN, reason="PyTorch built without oneDNN")
def test_onednn_network_follows_changing_input_shapes(monkeypatch):
    # Weights are reordered per input shape; a full cache starts afresh instead of growing.
    monkeypatch.setattr(OneDNNConv2dReLU, "MAX_SHAPES", 2)
    model = _model(TINY)
    network = optimize_for_inference(model)
    for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (2, 3, 45, 39), (1, 3, 32, 32)]:
        x = torch.randn(shape)
        expected = _reference(model, x)
        with torch.no_grad():
            assert _relative_error(network(x), expected) <= 1e-5
    conv = network.stem.conv
    assert 1 <= len(conv._reordered) <= 2


@pytest.mark.skipif(not HAS_ONEDNN, reason="PyTorch built without oneDNN")
def test_onednn_network_copies_pickles_and_saves_plain_weights():
    model = _model(TINY)
    network = optimize_for_inference(model)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = network(x)  # fills the reordered-weight caches that copies must not carry
        for clone in (copy.deepcopy(network), pickle.loads(pickle.dumps(network))):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    assert all(not value.is_mkldnn for value in network.state_dict().values())


# bfloat16 keeps 8 significant bits: each rounding is off by up to 2**-9 (0.2%) of its value, and
# these networks round a few dozen times on the way to the logits. Against float64, the largest
# logit error relative to the largest logit was 0.3-1.1% over 14 seeds on an AVX-512 + AVX512_BF16
# CPU, also with its kernels limited to AVX2 or to scalar code (ATEN_CPU_CAPABILITY,
# ONEDNN_MAX_CPU_ISA); 2% bounds it with room for other kernels.
BF16_TOLERANCE = 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bc-imagenet", "plain-c1-cifar"])
def test_bf16_is_within_tolerance(name, device):
    model = _model(CONFIGS[name], device)
    x = torch.randn(4, 3, 40, 40, device=device)
    expected = _reference(model, x)
    with torch.no_grad():
        actual = optimize_for_inference(model, dtype=torch.bfloat16)(x)
    assert _relative_error(actual, expected) <= BF16_TOLERANCE


# 400 random inputs to a random 20-class network: 100% agreement in every one of 14 seeds on the
# kernel sets above; 99% allows 4 inputs whose top two logits lie within bf16's rounding.
def test_bf16_top1_agrees_with_fp32():
    model = _model(dict(TINY, num_classes=20, stem="cifar"))
    x = torch.randn(400, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).argmax(1)
        actual = optimize_for_inference(model, dtype=torch.bfloat16)(x).argmax(1)
    assert (actual == expected).float().mean().item() >= 0.99


def test_paper_preset_with_real_depth():
    # Densenet-BC-100's 16-layer blocks exercise long preallocated buffers.
    model = randomize_batchnorm(create_model("densenet_bc100_k12")).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = _reference(model, x)
    with torch.no_grad():
        actual = optimize_for_inference(model)(x)
    assert _relative_error(actual, expected) <= 1e-5


def test_onednn_bf16_runs_where_the_cpu_has_bf16_units_and_is_refused_elsewhere():
    # oneDNN computes bf16 natively with AVX512_BF16 or AMX; without them it has no bf16 kernels.
    model = _model(TINY)
    x = torch.randn(2, 3, 40, 40)
    if onednn_supports(torch.device("cpu"), torch.bfloat16):
        network = optimize_for_inference(model, dtype=torch.bfloat16, conv_backend="onednn")
        with torch.no_grad():
            assert _relative_error(network(x), _reference(model, x)) <= BF16_TOLERANCE
    else:
        with pytest.raises(ConfigError, match="bf16 units"):
            optimize_for_inference(model, dtype=torch.bfloat16, conv_backend="onednn")


@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
def test_clamped_relu_identity_holds_for_every_sign_of_scale(sign):
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(sign * torch.rand(6) + sign * 0.5)
        bn.bias.copy_(torch.randn(6))
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.5)
    clamp, scale, shift = ClampedReLU.from_bn(bn)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    rewritten = scale.view(1, -1, 1, 1) * clamp.double()(x) + shift.view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.relu(bn.double()(x))
    torch.testing.assert_close(rewritten, expected)


def test_original_model_is_left_untouched():
    model = _model(TINY)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimize_for_inference(model, dtype=torch.bfloat16)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(value.dtype != torch.bfloat16 for value in after.values())


def test_layout_and_no_gradients():
    network = optimize_for_inference(_model(TINY))
    conv = network.stem.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in network.parameters())


def test_bad_inputs_raise_config_errors():
    model = _model(TINY)
    with pytest.raises(ConfigError, match="conv_backend"):
        optimize_for_inference(model, conv_backend="mkl")
    with pytest.raises(ConfigError, match="compile"):
        optimize_for_inference(model, conv_backend="onednn", compile=True)
    with pytest.raises(ConfigError, match="dtype"):
        optimize_for_inference(model, dtype=torch.float16)
    with pytest.raises(ConfigError, match=r"densenet\.DenseNet"):
        optimize_for_inference(nn.Linear(2, 2))  # type: ignore[arg-type]
    custom_head = _model(TINY)
    custom_head.classifier = nn.Sequential(nn.Linear(custom_head.num_features, 5), nn.Tanh())
    with pytest.raises(ConfigError, match="Sequential"):
        optimize_for_inference(custom_head)
    with pytest.raises(ConfigError, match="input channels"):
        optimize_for_inference(model)(torch.randn(1, 1, 40, 40))
    with pytest.raises(ConfigError, match="too small"):
        optimize_for_inference(model)(torch.randn(1, 3, 4, 4))


@pytest.mark.skipif(
    os.environ.get("DENSENET_TEST_COMPILE") != "1",
    reason="torch.compile takes a minute on 2 cores; set DENSENET_TEST_COMPILE=1 to run",
)
def test_compiled_network_computes_the_same_function():
    model = _model(TINY)
    x = torch.randn(3, 3, 40, 40)
    expected = _reference(model, x)
    with torch.no_grad():
        actual = optimize_for_inference(model, compile=True)(x)
    assert _relative_error(actual, expected) <= 1e-5
