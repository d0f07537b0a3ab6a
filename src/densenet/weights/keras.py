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
# A keras.applications DenseNet holds at most 20M values. The file's own size bounds nothing (HDF5
# datasets can be compressed, or declared and never written), so this bound is checked before the
# arrays are read into memory.
MAX_KERAS_VALUES = 2**28
_NOT_KERAS = "the file is damaged or not Keras weights; in Keras, save the model with model.save"

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
    import h5py

    root = handle.get("model_weights", handle)
    if not isinstance(root, h5py.Group):
        raise WeightsError(f"{path}: 'model_weights' is not an HDF5 group; {_NOT_KERAS}")
    if "layer_names" in root.attrs:
        layers = {}
        values = 0
        for name in _names(root.attrs["layer_names"], path, "the layer_names attribute"):
            group = root.get(name)
            if not isinstance(group, h5py.Group):
                raise WeightsError(
                    f"{path}: layer_names lists {name!r} but the file has no group of that name; "
                    f"{_NOT_KERAS}"
                )
            where = f"the weight_names attribute of {name!r}"
            weight_names = _names(group.attrs.get("weight_names", []), path, where)
            datasets = [_dataset(group, weight, path) for weight in weight_names]
            values += sum(dataset.size for dataset in datasets)
            if values > MAX_KERAS_VALUES:
                raise WeightsError(
                    f"{path}: the layers up to {name!r} hold {values} values, more than the "
                    f"{MAX_KERAS_VALUES} allowed (a keras.applications DenseNet has 20M); "
                    f"{_NOT_KERAS}"
                )
            arrays = [np.asarray(dataset[()]) for dataset in datasets]
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


def _names(value: object, path: Path, where: str) -> list[str]:
    """The strings of a Keras name-list attribute (an array of bytes or str)."""
    names = np.asarray(value)
    if names.size == 0:
        return []
    if names.ndim != 1 or names.dtype.kind not in "SUO":
        raise WeightsError(
            f"{path}: {where} must be a list of names, got an array of shape {names.shape} and "
            f"type {names.dtype}; {_NOT_KERAS}"
        )
    if not all(isinstance(name, (bytes, str)) for name in names.tolist()):
        raise WeightsError(f"{path}: {where} must hold only names; {_NOT_KERAS}")
    return [_text(name) for name in names.tolist()]


def _dataset(group, name: str, path: Path):
    """The numeric dataset ``name`` of ``group``, not yet read."""
    import h5py

    dataset = group.get(name)
    where = f"{group.name}/{name}"
    if not isinstance(dataset, h5py.Dataset):
        raise WeightsError(
            f"{path}: weight_names lists {where!r} but the file has no dataset of that name; "
            f"{_NOT_KERAS}"
        )
    if dataset.dtype.kind not in "fiu" or dataset.shape is None:
        raise WeightsError(
            f"{path}: dataset {where!r} holds {dataset.dtype} values of shape {dataset.shape}, "
            f"expected an array of numbers; {_NOT_KERAS}"
        )
    return dataset


def _text(value: object) -> str:
    return value.decode("utf8", errors="replace") if isinstance(value, bytes) else str(value)


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
    shapes = [array.shape for array in arrays]
    if kind == "conv":
        fits, wanted = len(shapes[0]) == 4, "a 4-d kernel (height, width, in, out)"
    elif kind == "classifier":
        fits = len(shapes[0]) == 2 and shapes[1] == shapes[0][1:]
        wanted = "a 2-d kernel (in, out) and a bias of out values"
    else:
        fits = len(shapes[0]) == 1 and all(shape == shapes[0] for shape in shapes)
        wanted = "four 1-d arrays of equal length (gamma, beta, mean, variance)"
    if not fits:
        raise WeightsError(
            f"{source}: Keras layer {name!r} holds arrays of shapes "
            f"{', '.join(str(shape) for shape in shapes)}, expected {wanted}; {_NOT_KERAS}"
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
