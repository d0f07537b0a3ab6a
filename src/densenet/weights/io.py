"""Reading and writing weights: the project's safetensors format and foreign checkpoints.

The project's format is a single ``.safetensors`` file whose header metadata holds the model config
and its preprocessing as JSON, so the file alone rebuilds the model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from densenet.errors import ConfigError, WeightsError, brief, first_line
from densenet.files import atomic_write
from densenet.models.densenet import DenseNetConfig
from densenet.models.presets import Preprocessing
from densenet.weights.download import fetch, is_url
from densenet.weights.keras import is_hdf5, read_keras_h5

FORMAT_TAG = "densenet/1"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
KERAS_SUFFIXES = (".h5", ".hdf5")

# torchvision's pre-0.3 checkpoints name dense-layer submodules "norm.1", "conv.2", ...
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass
class Checkpoint:
    """Tensors read from a weights file, with the config and metadata when the file carries them.

    ``preprocessing`` and ``class_names`` are the checked, typed values of the same entries of
    ``meta``; the rest of ``meta`` is informational (where the weights came from, their accuracy).
    """

    state_dict: dict[str, Tensor]
    source: str
    config: DenseNetConfig | None = None
    meta: dict[str, object] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        weight = self.state_dict.get("classifier.weight")
        return None if weight is None else int(weight.shape[0])


def looks_like_a_file(source: str) -> bool:
    """Whether ``source`` is meant as a path (so "not found" is the error), not a weights name."""
    path = Path(source)
    suffixes = (".safetensors", *PICKLE_SUFFIXES, *KERAS_SUFFIXES)
    return path.exists() or len(path.parts) > 1 or path.suffix in suffixes


def resolve_source(source: str | os.PathLike[str], expected_hash: str | None = None) -> Path:
    """A local path for ``source``: the path itself, or a URL downloaded once into the cache."""
    text = os.fspath(source)
    if is_url(text):
        return fetch(text, expected_hash, progress=True)
    path = Path(text)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Find the state_dict inside common checkpoint layouts (plain, {'state_dict': ...}, DDP)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict of tensors")
    return {key.removeprefix("module."): value for key, value in obj.items()}


def rename_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision's legacy ``...denselayer1.norm.1.weight`` keys to ``...norm1.weight``."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def read_checkpoint(source: str | os.PathLike[str], expected_hash: str | None = None) -> Checkpoint:
    """Read weights from a local file or URL: the project's safetensors, a torchvision or timm
    checkpoint (pickle or safetensors), or a Keras .h5 file."""
    path = resolve_source(source, expected_hash)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, os.fspath(source))
    if path.suffix in KERAS_SUFFIXES or is_hdf5(path):
        return Checkpoint(read_keras_h5(path), os.fspath(source))
    if path.suffix not in PICKLE_SUFFIXES:
        raise WeightsError(
            f"unknown weights format {path.suffix!r} for {path}; this reads .safetensors, Keras "
            f".h5 and PyTorch state_dicts ({', '.join(PICKLE_SUFFIXES)}): in PyTorch save one with "
            "torch.save(model.state_dict(), 'weights.pth'), then `densenet convert` it"
        )
    if not _starts_like_torch_save(path):
        raise WeightsError(
            f"cannot read {path} as a PyTorch checkpoint (it is neither a zip archive nor a "
            "pickle, the two formats torch.save writes): the file is damaged or not a checkpoint"
        )
    try:
        # weights_only refuses arbitrary pickled objects: a checkpoint can't run code on load.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"cannot read {path} as plain PyTorch weights ({_refusal_reason(error)}): a pickle "
            "may hold only tensors here, because loading anything else can run code from the "
            "file. Get these weights as a .safetensors file or as a plain state_dict of tensors "
            "(torch.save(model.state_dict(), path)); `densenet convert` turns either into this "
            "project's format"
        ) from None
    except Exception as error:  # torch raises many types for corrupt archives
        raise WeightsError(
            f"cannot read {path} as a PyTorch checkpoint ({first_line(error)}): the file is "
            "damaged or not a checkpoint"
        ) from None
    return Checkpoint(rename_legacy_keys(_unwrap(obj, path)), os.fspath(source))


def _starts_like_torch_save(path: Path) -> bool:
    """Whether the file begins as torch.save's output does: a zip archive's local header, or (the
    format before PyTorch 1.6) a pickle's protocol opcode. Other files would reach the unpickler
    and be refused as unsafe pickles, advice that doesn't fit a damaged file."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith((b"PK\x03\x04", pickle.PROTO))


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its advice: that advice is to
    load with ``weights_only=False``, which for an untrusted file is the attack."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(error))
    return match.group(1).strip() if match else "it holds more than tensors"


def _read_safetensors(path: Path, source: str) -> Checkpoint:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            # A safe_open handle has keys() but is not iterable itself.
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"cannot read {path} as safetensors: {error}") from None
    checkpoint = Checkpoint(rename_legacy_keys(state_dict), source)
    config = _metadata_object(metadata, "config", path)
    if config is not None:
        checkpoint.config = _checked(DenseNetConfig.from_dict, config, path, "config")
    checkpoint.meta = _metadata_object(metadata, "meta", path) or {}
    _read_meta(checkpoint, path)
    return checkpoint


# What a file whose metadata is wrong calls for: nothing in it can be trusted to be meant.
_UNUSABLE = "the file is damaged or was not written by densenet; get it again from its source"


def _metadata_object(metadata: dict[str, str], key: str, path: Path) -> dict | None:
    """The JSON object stored under ``key`` in safetensors metadata, or None if there is none."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError) as error:
        raise WeightsError(
            f"{path}: metadata {key!r} is not JSON ({first_line(error)}); expected a JSON object; "
            f"{_UNUSABLE}"
        ) from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise WeightsError(
            f"{path}: metadata {key!r} is a JSON {kind}, expected a JSON object; {_UNUSABLE}"
        )
    return value


_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
Parsed = TypeVar("Parsed")


def _checked(parse: Callable[[object], Parsed], value: object, path: Path, key: str) -> Parsed:
    """``parse(value)``, with a ``ConfigError`` turned into a ``WeightsError`` naming the file."""
    try:
        return parse(value)
    except ConfigError as error:
        raise WeightsError(f"{path}: metadata {key!r} is invalid: {error}; {_UNUSABLE}") from None


def _read_meta(checkpoint: Checkpoint, path: Path) -> None:
    """Check the entries of ``meta`` that the library uses and set their typed fields."""
    meta, config = checkpoint.meta, checkpoint.config
    if "preprocessing" in meta:
        preprocessing = _checked(Preprocessing.from_dict, meta["preprocessing"], path, "meta")
        if config is not None and len(preprocessing.mean) != config.in_channels:
            raise WeightsError(
                f"{path}: metadata preprocessing.mean has {len(preprocessing.mean)} values but "
                f"the model takes {config.in_channels} channels; {_UNUSABLE}"
            )
        checkpoint.preprocessing = preprocessing
    if "class_names" in meta:
        names = meta["class_names"]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise WeightsError(
                f"{path}: metadata class_names must be a list of strings, got {brief(names)}; "
                f"{_UNUSABLE}"
            )
        outputs = config.num_classes if config is not None else checkpoint.num_classes
        if outputs is not None and len(names) != outputs:
            raise WeightsError(
                f"{path}: metadata class_names has {len(names)} names for a model with {outputs} "
                f"outputs; {_UNUSABLE}"
            )
        checkpoint.class_names = names


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], meta: dict[str, object] | None = None
) -> Path:
    """Write ``model``'s weights, config and ``meta`` to a self-describing safetensors file.

    The file is written beside its destination and renamed into place, so a crash never leaves a
    half-written file under the final name.
    """
    path = Path(path)
    config: DenseNetConfig = model.config  # type: ignore[assignment]
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {
        "format": FORMAT_TAG,
        "config": json.dumps(config.to_dict()),
        "meta": json.dumps(meta or {}),
    }
    # Serialised here and written by Python, so a full disk is an OSError that names the file.
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def fitted_state_dict(
    expected: dict[str, Tensor], state_dict: dict[str, Tensor], source: str = ""
) -> dict[str, Tensor]:
    """``state_dict``, completed, if its keys and shapes are those of ``expected`` (whose values
    may be on the meta device: only shapes are compared); else one ``WeightsError`` naming every
    mismatch."""
    # Checkpoints saved before PyTorch 0.4.1 carry no BN batch counters; they don't affect outputs.
    state_dict = dict(state_dict)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or misshaped:
        problems = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
                )
                problems.append(f"{label}: {shown}")
        where = f" in {source}" if source else ""
        raise WeightsError(f"weights{where} do not fit the model; " + "; ".join(problems))
    return state_dict
