import pytest
import torch
from torch import nn

from architectures import TINY
from densenet import ConfigError, DenseNet, DenseNetConfig
from densenet.models.densenet import DenseLayer
from densenet.models.presets import PRESETS


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(growth_rate=0), "growth_rate"),
        (dict(growth_rate=-3), "growth_rate"),
        (dict(compression=0.0), "compression"),
        (dict(compression=1.5), "compression"),
        (dict(block_config=()), "block_config"),
        (dict(block_config=(3, 0)), r"block_config\[1\]"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(stem="resnet"), "stem"),
        (dict(bn_size=-1), "bn_size"),
        (dict(compression=0.001), r"transitions of \[0, 0, 0\] channels"),
        (
            dict(growth_rate=100_000_000),
            "has [0-9,]+ parameters, more than the 268,435,456 allowed",
        ),
        (dict(num_classes=10**30), "num_classes 10+ alone gives more parameters than"),
    ],
)
def test_bad_config_raises_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        DenseNetConfig(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {**TINY, "bn_size": 0, "compression": 0.3, "num_classes": 0},
        {**TINY, "stem": "cifar", "in_channels": 1, "block_config": (3,)},
        *(spec.config.to_dict() for spec in PRESETS.values()),
    ],
)
def test_the_parameter_count_is_known_before_the_network_is_built(fields):
    config = DenseNetConfig(**fields)
    with torch.device("meta"):
        assert config.num_parameters == sum(p.numel() for p in DenseNet(config).parameters())


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="growthrate"):
        DenseNetConfig().replace(growthrate=12)


@pytest.mark.parametrize(
    "stem, blocks, minimum", [("imagenet", 4, 29), ("cifar", 3, 4), ("cifar", 1, 1)]
)
def test_min_input_size_is_exact(stem, blocks, minimum):
    model = DenseNet(**{**TINY, "block_config": (1,) * blocks, "stem": stem}).eval()
    assert model.config.min_input_size == minimum
    with torch.no_grad():
        model(torch.randn(1, 3, minimum, minimum))  # the smallest allowed size runs
    if minimum > 1:
        with pytest.raises(ValueError, match=f"at least {minimum} px"):
            model(torch.randn(1, 3, minimum - 1, minimum))


def test_input_checks_happen_before_computation():
    model = DenseNet(**TINY)
    calls = []
    model.features.conv0.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 64, 64))
    assert calls == []


def test_the_config_checks_inputs_for_every_network_built_from_it():
    config = DenseNetConfig(**TINY)
    config.check_input(torch.randn(2, 3, 5, 5))  # two blocks after the ImageNet stem
    with pytest.raises(ConfigError, match="3 input channels, got 1"):
        config.check_input(torch.randn(2, 1, 64, 64))
    with pytest.raises(ConfigError, match="at least 5 px"):
        config.check_input(torch.randn(2, 3, 4, 64))


def test_layer_shapes_follow_the_paper():
    # Layer l of a block sees k0 + k*(l-1) channels; transitions keep floor(theta*m).
    model = DenseNet(
        growth_rate=12,
        block_config=(3, 3, 3),
        num_init_features=24,
        compression=0.5,
        stem="cifar",
        num_classes=10,
    )
    block = model.features.denseblock1
    assert [layer.norm1.num_features for layer in block.values()] == [24, 36, 48]
    assert model.features.transition1.conv.out_channels == int(60 * 0.5)
    assert model.num_features == 69  # 24+36=60 -> 30; 30+36=66 -> 33; 33+36
    assert model.features.denseblock1.denselayer1.conv1.out_channels == 4 * 12


def test_plain_layer_has_no_bottleneck():
    layer = DenseLayer(16, 12, bn_size=0, drop_rate=0.0)
    assert layer.conv1.kernel_size == (3, 3)
    assert not hasattr(layer, "conv2")


def test_initialisation_matches_the_authors_code():
    model = DenseNet(
        growth_rate=32, block_config=(6,), num_init_features=64, num_classes=10, stem="cifar"
    )
    conv = model.features.denseblock1.denselayer6.conv1  # 1x1, 128 outputs: std sqrt(2/128)
    assert conv.weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.05)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert torch.all(model.classifier.bias == 0)


def test_uniform_interface():
    model = DenseNet(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape[1] == model.num_features
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    assert torch.equal(model.forward_head(features), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.config.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_dropout_after_every_convolution_only_in_training():
    model = DenseNet(**{**TINY, "drop_rate": 0.5, "bn_size": 0})
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    zeros = []
    model.features.denseblock1.denselayer1.register_forward_hook(
        lambda m, i, out: zeros.append((out == 0).float().mean().item())
    )
    model(x)
    assert 0.3 < zeros[0] < 0.7  # ReLU alone can't zero a conv output this often


def test_relu_is_not_in_place_so_hooks_see_their_tensors():
    model = DenseNet(**TINY)
    captured = {}
    model.features.denseblock1.denselayer1.norm1.register_forward_hook(
        lambda m, i, out: captured.setdefault("bn", out)
    )
    model(torch.randn(2, 3, 32, 32))
    assert (captured["bn"] < 0).any()  # an in-place ReLU would have clamped it
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def _conv_input_versions(model: DenseNet, x: torch.Tensor) -> list[int]:
    """How often the stem pool's input, each bottleneck conv's and the global pool's was
    written after it was made: 1 if the ReLU before it reused the BatchNorm's output, 0 if it made
    a tensor of its own."""
    versions = []
    record = lambda module, inputs: versions.append(inputs[0]._version)  # noqa: E731
    for layer in model.modules():
        if isinstance(layer, DenseLayer):
            layer.conv1.register_forward_pre_hook(record)
    # The stem's and the final BN-ReLU's too: what the max pool and the global pool read.
    model.features.pool0.register_forward_pre_hook(record)
    model.global_pool.register_forward_pre_hook(record)
    model(x)
    return versions


@pytest.mark.parametrize("training", [True, False])
def test_unhooked_relus_reuse_the_norms_output(training):
    # Without a hook on the norm or the ReLU nobody can see the BN output change: the ReLU
    # overwrites it, as torchvision's in-place ReLU does (the torchvision equivalence tests show
    # the result is the same).
    model = DenseNet(**TINY).train(training)
    x = torch.randn(2, 3, 32, 32)
    assert set(_conv_input_versions(model, x)) == {1}


def test_a_hook_on_the_norm_or_the_relu_keeps_the_relu_out_of_place():
    model = DenseNet(**TINY)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    first, second = model.features.denseblock1.denselayer1, model.features.denseblock1.denselayer2
    first.norm1.register_forward_hook(lambda m, i, out: None)
    # A full backward hook wraps the ReLU's input in a view that an in-place ReLU would break.
    second.relu1.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    model.features.relu.register_forward_hook(lambda m, i, out: None)  # as Grad-CAM does
    versions = _conv_input_versions(model, x)
    # In call order: the stem, the two hooked layers, the rest, the hooked final ReLU.
    assert versions[:3] == [1, 0, 0] and set(versions[3:-1]) == {1} and versions[-1] == 0
    model(x).sum().backward()
    assert x.grad is not None


def test_a_dense_layer_takes_the_earlier_maps_as_a_list_or_joined():
    layer = DenseNet(**TINY).features.denseblock1.denselayer2.eval()
    maps = [torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)]
    with torch.no_grad():
        assert torch.equal(layer(maps), layer(torch.cat(maps, 1)))
