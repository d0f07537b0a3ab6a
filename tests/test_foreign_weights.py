"""timm and Keras models, saved in their own formats, load here and compute the same function.

Each reference is built with random weights and non-trivial BN statistics, so a wrong mapping
(a transposed kernel, a swapped BN parameter, the Keras epsilon) shows up in the outputs.
"""

import os

import numpy as np
import pytest
import torch

from conftest import randomize_batchnorm
from densenet import WeightsError, create_model
from densenet.keras_weights import KERAS_BN_EPSILON

os.environ["KERAS_BACKEND"] = "torch"


# --- timm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_timm_checkpoint_gives_the_same_function(file_format, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    reference = randomize_batchnorm(timm.create_model("densenet121", pretrained=False)).eval()
    state_dict = reference.state_dict()
    # The two files timm publishes on the Hugging Face hub.
    if file_format == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(state_dict, path)

    model = create_model("densenet121", weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_timm_model_of_another_architecture_names_the_mismatch(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "blur.bin"
    torch.save(timm.create_model("densenetblur121d").state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit the model; missing: .*unexpected: "):
        create_model("densenet121", weights=path)


# --- Keras --------------------------------------------------------------------------------------


def keras_densenet(blocks_name, input_size=64):
    """A keras.applications DenseNet with random kernels and random BN statistics."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs with another backend in this process")
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, blocks_name)(
        weights=None, input_shape=(input_size, input_size, 3), classifier_activation=None
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.uniform(-0.2, 0.2, n),
                    rng.uniform(-0.5, 0.5, n),
                    # Small variances make the epsilon matter: 1e-8 apart is visible here.
                    rng.uniform(0.0, 1e-4, n) if layer.name == "bn" else rng.uniform(0.5, 2.0, n),
                ]
            )
    return model


def save_legacy_weights(model, path):
    """The layout of the files keras.applications publishes (weights only, one group a layer)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


@pytest.fixture(scope="module")
def keras_121():
    return keras_densenet("DenseNet121")


def keras_outputs(model, x):
    import keras

    return torch.as_tensor(keras.ops.convert_to_numpy(model(x.permute(0, 2, 3, 1), training=False)))


@pytest.mark.parametrize("layout", ["published", "model.save", "weights.h5"])
def test_keras_densenet121_gives_the_same_function(keras_121, layout, tmp_path):
    if layout == "published":
        path = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels.h5"
        save_legacy_weights(keras_121, path)
    elif layout == "model.save":
        path = tmp_path / "densenet121.h5"
        keras_121.save(path)
    else:
        path = tmp_path / "densenet121.weights.h5"
        keras_121.save_weights(path)

    model = create_model("densenet121", weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
    theirs = keras_outputs(keras_121, x)
    assert ours.abs().max() > 1  # a meaningful comparison, not two near-zero outputs
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_keras_softmax_head_is_our_logits_through_softmax(keras_121, tmp_path):
    import keras

    path = tmp_path / "densenet121.h5"
    save_legacy_weights(keras_121, path)
    model = create_model("densenet121", weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    head = keras_121.get_layer("predictions")
    head.activation = keras.activations.softmax  # the published models end in a softmax
    try:
        probabilities = keras_outputs(keras_121, x)
    finally:
        head.activation = keras.activations.linear
    with torch.no_grad():
        assert (model(x).softmax(1) - probabilities).abs().max().item() <= 1e-4


def test_keras_epsilon_is_folded_into_the_variance(keras_121, tmp_path):
    path = tmp_path / "densenet121.h5"
    save_legacy_weights(keras_121, path)
    model = create_model("densenet121", weights=path)
    keras_variance = torch.as_tensor(keras_121.get_layer("bn").moving_variance.numpy())
    difference = model.features.norm5.running_var.double() - keras_variance.double()
    assert torch.allclose(difference, torch.full_like(difference, KERAS_BN_EPSILON - 1e-5))


@pytest.mark.parametrize("name", ["DenseNet169", "DenseNet201"])
def test_keras_deeper_densenets(name, tmp_path):
    reference = keras_densenet(name, input_size=32)
    path = tmp_path / f"{name}.h5"
    save_legacy_weights(reference, path)
    model = create_model(name.lower(), weights=path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - keras_outputs(reference, x)).abs().max().item() <= 1e-4


def test_keras_file_of_another_depth_names_the_mismatch(keras_121, tmp_path):
    path = tmp_path / "densenet121.h5"
    save_legacy_weights(keras_121, path)
    with pytest.raises(WeightsError, match=r"missing: features\.denseblock3\.denselayer25"):
        create_model("densenet169", weights=path)


def test_h5_that_is_not_keras_weights(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not Keras weights"):
        create_model("densenet121", weights=path)


def test_missing_h5py_is_explained(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "w.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(WeightsError, match=r"needs h5py: pip install 'densenet\[keras\]'"):
        create_model("densenet121", weights=path)
