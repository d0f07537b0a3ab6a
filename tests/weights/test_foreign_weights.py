"""timm and Keras models, saved in their own formats, load here and compute the same function.

Each reference is built with random weights and non-trivial BN statistics, so a wrong mapping
(a transposed kernel, a swapped BN parameter, the Keras epsilon) shows up in the outputs.
"""

import os
import sys

import numpy as np
import pytest
import torch

from conftest import randomize_batchnorm
from densenet import WeightsError, create_model
from densenet.errors import MissingPackageError
from densenet.weights import keras as keras_weights
from densenet.weights.io import read_checkpoint
from densenet.weights.keras import KERAS_BN_EPSILON

os.environ["KERAS_BACKEND"] = "torch"


# --- timm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_121():
    """A timm densenet121 with random weights, and its outputs on a random input."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = randomize_batchnorm(timm.create_model("densenet121", pretrained=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return reference, x, reference(x)


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_timm_checkpoint_gives_the_same_function(timm_121, file_format, tmp_path):
    from safetensors.torch import save_file

    reference, x, expected = timm_121
    state_dict = reference.state_dict()
    # The two files timm publishes on the Hugging Face hub.
    if file_format == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(state_dict, path)

    model = create_model("densenet121", weights=path).eval()
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-5


def test_features_only_matches_timm_features_only(timm_121, tmp_path):
    timm = pytest.importorskip("timm")
    reference, x, _ = timm_121
    path = tmp_path / "model.bin"
    torch.save(reference.state_dict(), path)
    timm_features = timm.create_model("densenet121", features_only=True)
    # timm's feature wrapper flattens "features.conv0" to "features_conv0" and has no head.
    timm_features.load_state_dict(
        {
            key.replace("features.", "features_", 1): value
            for key, value in reference.state_dict().items()
            if not key.startswith("classifier.")
        }
    )
    ours = create_model("densenet121", weights=path, features_only=True).eval()
    assert ours.channels == timm_features.feature_info.channels()
    assert ours.strides == timm_features.feature_info.reduction()
    with torch.no_grad():
        for mine, theirs in zip(ours(x), timm_features.eval()(x), strict=True):
            assert (mine - theirs).abs().max().item() <= 1e-5


def test_timm_model_of_another_architecture_names_the_mismatch(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "blur.bin"
    torch.save(timm.create_model("densenetblur121d").state_dict(), path)
    expected = r"unexpected: features\.conv1\.weight.*mis-shaped: features\.conv0\.weight"
    with pytest.raises(WeightsError, match=expected):
        create_model("densenet121", weights=path)


# --- Keras --------------------------------------------------------------------------------------
# Keras with the PyTorch backend is slow here: building DenseNet121 takes ~4 s and one forward
# pass ~4 s (2 cores), so one model is built and run once, and its outputs are reused.


@pytest.fixture(scope="module")
def keras_121():
    """A keras.applications DenseNet121 with random weights and BN statistics, and its final
    feature map, logits and softmax output on a random input (one forward pass)."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs with another backend in this process")
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(
        weights=None, input_shape=(32, 32, 3), classifier_activation=None
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma, variance = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 2.0, n)
            if layer.name == "bn":
                # Variances near the epsilon make its difference (1e-8) visible in the output;
                # a matching small gamma keeps the features of order 1.
                gamma, variance = rng.uniform(0.002, 0.01, n), rng.uniform(1e-6, 3e-5, n)
            mean, beta = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.2, 0.2, n)
            layer.set_weights([gamma, beta, mean, variance])
    head = model.get_layer("predictions")
    head.set_weights([rng.normal(0, 0.05, head.kernel.shape), rng.normal(0, 0.1, head.bias.shape)])

    logits = head.output
    probabilities = keras.layers.Activation("softmax")(logits)  # how the published models end
    probe = keras.Model(model.input, [model.get_layer("relu").output, logits, probabilities])
    x = torch.randn(2, 3, 32, 32)
    outputs = probe(x.permute(0, 2, 3, 1), training=False)
    features, logits, probabilities = (
        torch.as_tensor(keras.ops.convert_to_numpy(o)) for o in outputs
    )
    return model, x, features.permute(0, 3, 1, 2), logits, probabilities


def save_legacy_weights(model, path):
    """The layout of the files keras.applications publishes (weights only, one group a layer)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


@pytest.mark.parametrize("layout", ["published", "model.save"])
def test_keras_densenet121_gives_the_same_function(keras_121, layout, tmp_path):
    reference, x, features, logits, probabilities = keras_121
    if layout == "published":
        path = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels.h5"
        save_legacy_weights(reference, path)
    else:
        path = tmp_path / "densenet121.h5"
        reference.save(path)

    model = create_model("densenet121", weights=path).eval()
    with torch.no_grad():
        our_features = model.forward_features(x)
        our_logits = model.forward_head(our_features)
    assert features.abs().max() > 1 and logits.abs().max() > 1  # a comparison that can fail
    assert (our_features - features).abs().max().item() <= 1e-4
    assert (our_logits - logits).abs().max().item() <= 1e-4
    # Keras' model ends in a softmax; ours returns the logits that go into it.
    assert (our_logits.softmax(1) - probabilities).abs().max().item() <= 1e-4


def test_keras_epsilon_is_folded_into_the_variance(keras_121, tmp_path):
    reference = keras_121[0]
    path = tmp_path / "densenet121.h5"
    save_legacy_weights(reference, path)
    model = create_model("densenet121", weights=path)
    keras_variance = torch.as_tensor(np.asarray(reference.get_layer("bn").moving_variance))
    difference = model.features.norm5.running_var.double() - keras_variance.double()
    assert torch.allclose(difference, torch.full_like(difference, KERAS_BN_EPSILON - 1e-5))


def test_keras_file_of_another_depth_names_the_mismatch(keras_121, tmp_path):
    path = tmp_path / "densenet121.h5"
    save_legacy_weights(keras_121[0], path)
    with pytest.raises(WeightsError, match=r"missing: features\.denseblock3\.denselayer25"):
        create_model("densenet169", weights=path)


def test_keras_backbone_only_file(keras_121, tmp_path):
    import h5py

    path = tmp_path / "notop.h5"
    save_legacy_weights(keras_121[0], path)
    with h5py.File(path, "r+") as handle:  # what the published *_notop.h5 files lack
        names = [n for n in handle.attrs["layer_names"] if n not in ("predictions", b"predictions")]
        handle.attrs["layer_names"] = names
        del handle["predictions"]
    with pytest.raises(WeightsError, match="holds no classifier"):
        create_model("densenet121", weights=path)
    model = create_model("densenet121", weights=path, num_classes=3).eval()
    _, x, features, _, _ = keras_121
    with torch.no_grad():
        assert (model.forward_features(x) - features).abs().max().item() <= 1e-4


def test_keras3_weights_file_is_refused_with_how_to_convert(keras_121, tmp_path):
    path = tmp_path / "densenet121.weights.h5"
    keras_121[0].save_weights(path)
    with pytest.raises(WeightsError, match=r"Keras 3 \.weights\.h5 .* model\.save\('model\.h5'\)"):
        create_model("densenet121", weights=path)


def test_h5_that_is_not_keras_weights(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not Keras weights"):
        create_model("densenet121", weights=path)


def test_foreign_layer_in_a_keras_file_is_named(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "resnet.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"conv1_conv", b"res2a_branch2a"]
        for name in ("conv1_conv", "res2a_branch2a"):
            handle[f"{name}/{name}/kernel:0"] = np.zeros((1, 1, 3, 64), np.float32)
            handle[name].attrs["weight_names"] = [f"{name}/kernel:0".encode()]
    with pytest.raises(WeightsError, match=r"layer 'res2a_branch2a' that a keras\.applications"):
        create_model("densenet121", weights=path)


def test_missing_h5py_is_explained(tmp_path, monkeypatch):
    path = tmp_path / "w.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    monkeypatch.setitem(sys.modules, "h5py", None)
    message = r"needs the h5py package: pip install 'densenet\[keras\]'"
    with pytest.raises(MissingPackageError, match=message):
        create_model("densenet121", weights=path)


def write_keras_stem(path, damage=None):
    """A Keras .h5 holding the ImageNet stem (conv1_conv, conv1_bn), optionally damaged."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"conv1_conv", b"conv1_bn"]
        kernel = np.zeros((7, 7, 3, 64) if damage != "kernel ndim" else (7, 7, 3), np.float32)
        handle["conv1_conv/conv1_conv/kernel:0"] = kernel
        handle["conv1_conv"].attrs["weight_names"] = [b"conv1_conv/kernel:0"]
        bn = ["gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"]
        for i, weight in enumerate(bn):
            length = 63 if damage == "bn lengths" and i == 3 else 64
            handle[f"conv1_bn/conv1_bn/{weight}"] = np.ones(length, np.float32)
        handle["conv1_bn"].attrs["weight_names"] = [f"conv1_bn/{w}".encode() for w in bn]
        if damage == "missing group":
            del handle["conv1_bn"]
        elif damage == "missing dataset":
            del handle["conv1_bn/conv1_bn/beta:0"]
        elif damage == "strings":
            del handle["conv1_conv/conv1_conv/kernel:0"]
            handle["conv1_conv/conv1_conv/kernel:0"] = np.array([b"a", b"b"])
        elif damage == "names not a list":
            handle.attrs["layer_names"] = 5
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing group", "layer_names lists 'conv1_bn' but the file has no group of that name"),
        ("missing dataset", "'/conv1_bn/conv1_bn/beta:0' but the file has no dataset"),
        ("strings", "holds |S1 values of shape (2,), expected an array of numbers"),
        ("kernel ndim", "shapes (7, 7, 3), expected a 4-d kernel"),
        ("bn lengths", "expected four 1-d arrays of equal length"),
        ("names not a list", "layer_names attribute must be a list of names"),
    ],
)
def test_damaged_keras_files_name_the_layer_and_what_was_expected(tmp_path, damage, message):
    pytest.importorskip("h5py")
    path = write_keras_stem(tmp_path / "w.h5", damage)
    with pytest.raises(WeightsError) as error:
        read_checkpoint(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_keras_arrays_are_counted_before_they_are_read(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    path = write_keras_stem(tmp_path / "w.h5")
    assert set(read_checkpoint(path).state_dict) >= {"features.conv0.weight"}
    # HDF5 arrays can be declared far larger than the file: the bound comes first.
    monkeypatch.setattr(keras_weights, "MAX_KERAS_VALUES", 7 * 7 * 3 * 64 + 3 * 64)
    with pytest.raises(WeightsError, match=r"the layers up to 'conv1_bn' hold 9664 values"):
        read_checkpoint(path)
