import os

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from densenet import ConfigError, DenseNet, quantize_int8

# int8 must pick the same class as float32 on at least this share of inputs (observed: 99.75% on
# held-out digits, 99.8% on random inputs).
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def digits_model():
    """A small DenseNet trained on sklearn's 8x8 digits (~98% held-out accuracy), and the data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps of an 8x8 network are too small to share between threads
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(y))
    x, y = x[order], y[order]
    train, test = slice(0, 1400), slice(1400, None)
    model = DenseNet(
        growth_rate=8, block_config=(3, 3), num_init_features=16, stem="cifar",
        in_channels=1, num_classes=10,
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        batch = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(model(x[train][batch]), y[train][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    yield model.eval(), x[train], x[test], y[test]
    torch.set_num_threads(threads)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def test_int8_agrees_with_fp32_on_real_and_random_inputs(digits_model):
    model, x_train, x_test, y_test = digits_model
    calibration = list(x_train[:512].split(64))
    quantized = quantize_int8(model, calibration)
    random_inputs = torch.rand(1000, 1, 8, 8)
    with torch.no_grad():
        fp32_test, int8_test = model(x_test), quantized(x_test)
        fp32_random, int8_random = model(random_inputs), quantized(random_inputs)
    assert (fp32_test.argmax(1) == y_test).float().mean().item() > 0.95
    assert _agreement(int8_test, fp32_test) >= MIN_AGREEMENT
    assert _agreement(int8_random, fp32_random) >= MIN_AGREEMENT
    # Really quantized, not a float copy: rounding to int8 moves the logits measurably.
    assert not torch.allclose(int8_test, fp32_test, atol=1e-4)


def test_int8_graph_holds_int8_weights_and_quantized_activations(digits_model):
    model, x_train, _, _ = digits_model
    quantized = quantize_int8(model, [x_train[:32]])
    targets = {str(node.target) for node in quantized.graph.nodes}
    assert any("quantize_per_tensor" in target for target in targets)
    assert any("dequantize_per_channel" in target for target in targets)
    int8_weights = [value for value in quantized.state_dict().values() if value.dtype == torch.int8]
    assert len(int8_weights) == sum(
        1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )


def test_model_is_left_untouched(digits_model):
    model, x_train, x_test, _ = digits_model
    with torch.no_grad():
        before = model(x_test)
        quantize_int8(model, [x_train[:32]])
        torch.testing.assert_close(model(x_test), before, rtol=0, atol=0)


def test_bad_inputs_raise_config_errors(digits_model):
    model, x_train, _, _ = digits_model
    with pytest.raises(ConfigError, match="at least one calibration batch"):
        quantize_int8(model, [])
    with pytest.raises(ConfigError, match="input channels"):
        quantize_int8(model, [torch.rand(4, 3, 8, 8)])
    with pytest.raises(ConfigError, match=r"densenet\.DenseNet"):
        quantize_int8(torch.nn.Linear(2, 2), [x_train[:4]])  # type: ignore[arg-type]


@pytest.mark.skipif(
    os.environ.get("DENSENET_TEST_COMPILE") != "1",
    reason="torch.compile takes a minute on 2 cores; set DENSENET_TEST_COMPILE=1 to run",
)
def test_compiled_int8_matches_eager_int8(digits_model):
    model, x_train, x_test, _ = digits_model
    calibration = list(x_train[:256].split(64))
    eager = quantize_int8(model, calibration)
    compiled = quantize_int8(model, calibration, compile=True)
    with torch.no_grad():
        assert _agreement(compiled(x_test), eager(x_test)) >= MIN_AGREEMENT
