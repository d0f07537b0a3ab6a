"""The small networks the tests build, each named once. Tests import them by name."""

from densenet import DenseNet, create_model

# Two short blocks behind the ImageNet stem: every kind of module, milliseconds per step.
TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)

# For sklearn's 8x8 greyscale digits, which it learns in seconds.
DIGITS = dict(growth_rate=8, block_config=(3, 3), num_init_features=16, stem="cifar", in_channels=1)

# `densenet train` flags that thin the default preset to one layer per block at k=4.
TINY_TRAIN_FLAGS = ("--model-override", "block_config=[1,1,1]", "--model-override", "growth_rate=4")


def short_bc(**overrides: object) -> DenseNet:
    """The CIFAR DenseNet-BC preset (k=12) with two layers per block, built through create_model."""
    return create_model("densenet_bc100_k12", block_config=(2, 2, 2), **overrides)
