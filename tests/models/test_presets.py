import pytest
import torch

from densenet import ConfigError, create_model, get_spec, list_models

# Exact torchvision counts; the CIFAR ones round to the paper's Table 2 (10 classes).
EXACT = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
PAPER_MILLIONS = {
    "densenet40_k12": 1.0,
    "densenet100_k12": 7.0,
    "densenet100_k24": 27.2,
    "densenet_bc100_k12": 0.8,
    "densenet_bc250_k24": 15.3,
    "densenet_bc190_k40": 25.6,
    "densenet264": 33.3,
}


def param_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name).parameters())


def test_registry_lists_every_preset():
    assert set(list_models()) == set(EXACT) | set(PAPER_MILLIONS)
    assert list_models("densenet_bc*") == [
        "densenet_bc100_k12",
        "densenet_bc250_k24",
        "densenet_bc190_k40",
    ]


@pytest.mark.parametrize("name", sorted(EXACT))
def test_imagenet_counts_equal_torchvision(name):
    assert param_count(name) == EXACT[name]


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_counts_round_to_the_paper(name):
    assert round(param_count(name) / 1e6, 1) == PAPER_MILLIONS[name]


@pytest.mark.parametrize("name", list_models())
def test_every_preset_runs_forward_and_backward(name):
    spec = get_spec(name)
    # Thin the widest presets so the test stays fast; the structure stays that of the preset.
    blocks = tuple(min(n, 2) for n in spec.config.block_config)
    model = create_model(name, block_config=blocks, num_classes=3)
    size = spec.config.min_input_size
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean densenet121"):
        create_model("densenet12l")


def test_overrides_reach_the_config():
    model = create_model(
        "densenet_bc100_k12", num_classes=100, drop_rate=0.2, block_config=(2, 2, 2)
    )
    assert model.config.num_classes == 100 and model.config.drop_rate == 0.2
    with pytest.raises(ConfigError, match="unknown config field"):
        create_model("densenet121", growth=12)
