"""Keras ``keras.applications`` DenseNet weights (.h5) as a state_dict of this project's model.

The published ImageNet files and Keras' ``model.save("m.h5")`` share one HDF5 layout: a group per
layer, listed by the ``layer_names`` / ``weight_names`` attributes. Keras reads them by layer order;
here each layer is mapped by its name, which keras.applications fixes:
``conv1_conv`` (stem), ``conv{b+1}_block{l}_{0_bn,1_conv,1_bn,2_conv}`` (dense layers),
``pool{b+1}_{bn,conv}`` (transitions), ``bn`` (final norm) and ``predictions`` (classifier).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from densenet.errors import WeightsError, require

# keras.applications builds every BatchNormalization with this epsilon; torch's default is 1e-5.
KERAS_BN_EPSILON = 1.001e-5
TORCH_BN_EPSILON = 1e-5
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_DENSE_LAYER = re.compile(r"^conv(\d+)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)$")
_TRANSITION = re.compile(r"^pool(\d+)_(bn|conv)$")
_DENSE_LAYER_PARTS = {"0_bn": "norm1", "1_conv": "conv1", "1_bn": "norm2", "2_conv": "conv2"}


def is_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def read_keras_h5(path: Path) -> dict[str, Tensor]:
    """The state_dict equivalent to the Keras DenseNet whose weights ``path`` holds."""
    require("h5py", purpose=f"reading Keras weights ({path})", extra="keras")
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            layers = _read_layers(handle, path)
    except OSError as error:
        raise WeightsError(f"cannot read {path} as HDF5: {error}") from None
    return keras_layers_to_state_dict(layers, str(path))


def _read_layers(handle, path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> its weight arrays, in Keras' order."""
    root = handle.get("model_weights", handle)
    if "layer_names" in root.attrs:
        layers = {}
        for raw_name in root.attrs["layer_names"]:
            name = _text(raw_name)
            group = root[name]
            arrays = [np.asarray(group[_text(w)]) for w in group.attrs.get("weight_names", [])]
            if arrays:
                # Files written by Keras 2.1 name the stem "conv1/conv" and "conv1/bn".
                layers[name.replace("/", "_")] = arrays
        return layers
    if "layers" in root:
        raise WeightsError(
            f"{path} is a Keras 3 .weights.h5 file, whose layers are named by type "
            "(conv2d_7), not by role, so they cannot be mapped: in Keras, load it into "
            "keras.applications.DenseNet121/169/201 and save with model.save('model.h5')"
        )
    raise WeightsError(
        f"{path} is an HDF5 file but not Keras weights (no layer_names attribute, no layers group)"
    )


def _text(value: object) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def keras_layers_to_state_dict(
    layers: dict[str, list[np.ndarray]], source: str = ""
) -> dict[str, Tensor]:
    blocks = {int(m.group(1)) for name in layers if (m := _DENSE_LAYER.match(name))}
    num_blocks = len(blocks)
    state_dict: dict[str, Tensor] = {}
    for name, arrays in layers.items():
        target = _target_module(name, num_blocks)
        if target is None:
            raise WeightsError(
                f"{source} has a layer {name!r} that a keras.applications DenseNet does not have; "
                "only DenseNet121/169/201 as built by keras.applications can be converted"
            )
        kind = "classifier" if name == "predictions" else name.rsplit("_", 1)[-1]
        state_dict.update(_convert(target, kind, arrays, name, source))
    return state_dict


def _target_module(name: str, num_blocks: int) -> str | None:
    if name == "conv1_conv":
        return "features.conv0"
    if name == "conv1_bn":
        return "features.norm0"
    if name == "bn":
        return f"features.norm{num_blocks + 1}"
    if name == "predictions":
        return "classifier"
    if match := _DENSE_LAYER.match(name):
        stage, layer, part = match.groups()
        block = int(stage) - 1
        return f"features.denseblock{block}.denselayer{layer}.{_DENSE_LAYER_PARTS[part]}"
    if match := _TRANSITION.match(name):
        stage, part = match.groups()
        return f"features.transition{int(stage) - 1}.{'norm' if part == 'bn' else 'conv'}"
    return None


def _convert(
    target: str, kind: str, arrays: list[np.ndarray], name: str, source: str
) -> dict[str, Tensor]:
    expected = {"conv": 1, "bn": 4, "classifier": 2}[kind]
    if len(arrays) != expected:
        raise WeightsError(
            f"{source}: Keras layer {name!r} holds {len(arrays)} arrays, expected {expected}"
        )
    if kind == "conv":
        # Keras kernels are (height, width, in, out); torch's are (out, in, height, width).
        return {f"{target}.weight": _tensor(arrays[0].transpose(3, 2, 0, 1))}
    if kind == "classifier":
        kernel, bias = arrays
        return {f"{target}.weight": _tensor(kernel.T), f"{target}.bias": _tensor(bias)}
    gamma, beta, mean, variance = arrays
    # BN divides by sqrt(var + eps): adding the epsilon difference to the variance makes torch's
    # smaller epsilon give exactly Keras' normalisation.
    variance = variance.astype(np.float64) + (KERAS_BN_EPSILON - TORCH_BN_EPSILON)
    return {
        f"{target}.weight": _tensor(gamma),
        f"{target}.bias": _tensor(beta),
        f"{target}.running_mean": _tensor(mean),
        f"{target}.running_var": _tensor(variance),
    }


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
