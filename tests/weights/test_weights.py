import json
import re

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from architectures import short_bc
from conftest import randomize_batchnorm
from densenet import WeightsError, create_model, load_model, save_weights
from densenet.cli import main
from densenet.weights.download import cached_path
from densenet.weights.io import read_checkpoint

LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def legacy_keys(state_dict):
    """Rename current torchvision keys to the pre-0.3 style (norm1.weight -> norm.1.weight)."""
    return {LEGACY.sub(r"\1.\2", key): value for key, value in state_dict.items()}


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
@pytest.mark.parametrize("style", ["current", "legacy"])
def test_torchvision_checkpoint_gives_the_same_function(name, style, tmp_path):
    reference = randomize_batchnorm(getattr(torchvision.models, name)()).eval()
    state_dict = reference.state_dict()
    if style == "legacy":
        state_dict = legacy_keys(state_dict)
        assert any(".norm.1." in key for key in state_dict)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "weights.pth"
    torch.save(state_dict, path)

    model = create_model(name, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        difference = (model(x) - reference(x)).abs().max().item()
    assert difference <= 1e-5


def test_own_format_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = randomize_batchnorm(short_bc(num_classes=4, growth_rate=6)).eval()
    path = save_weights(model, tmp_path / "m.safetensors", meta={"classes": list("abcd")})
    rebuilt, checkpoint = load_model(path)
    rebuilt.eval()
    assert rebuilt.config == model.config
    assert checkpoint.meta == {"classes": list("abcd")}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_new_head_keeps_the_backbone(tmp_path):
    model = short_bc(num_classes=10)
    path = save_weights(model, tmp_path / "m.safetensors")
    tuned = short_bc(weights=path, num_classes=3)
    assert tuned.classifier.out_features == 3
    assert torch.equal(tuned.features.conv0.weight, model.features.conv0.weight)


def test_mismatched_file_names_every_problem(tmp_path):
    state_dict = short_bc().state_dict()
    state_dict.pop("features.conv0.weight")
    state_dict["features.extra.weight"] = torch.zeros(1)
    state_dict["features.norm4.weight"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsError) as error:
        short_bc(weights=path)
    message = str(error.value)
    assert "missing: features.conv0.weight" in message
    assert "unexpected: features.extra.weight" in message
    assert "mis-shaped: features.norm4.weight (7,)" in message
    assert "\n" not in message


def test_different_architecture_is_named(tmp_path):
    path = save_weights(short_bc(), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="growth_rate=12"):
        short_bc(growth_rate=6, weights=path)


def test_pickles_load_only_plain_tensors_and_the_refusal_gives_only_the_safe_route(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": short_bc().state_dict(), "extra": object()}, path)
    with pytest.raises(WeightsError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "Unsupported global" in message and "evil.pth" in message
    assert ".safetensors" in message and "densenet convert" in message
    # torch's own advice (reload with weights_only=False) is how an untrusted file runs its code.
    assert "False" not in message and "trust" not in message
    assert "\n" not in message and "\x1b" not in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 64])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files_give_one_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="cannot read") as error:
        read_checkpoint(path)
    # A damaged file is called that, not refused as an unsafe pickle with advice on pickles.
    assert "pickle may hold only tensors" not in str(error.value)


def test_a_truncated_checkpoint_of_either_torch_save_format_is_called_damaged(tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"legacy_{legacy}.pth"
        torch.save(short_bc().state_dict(), path, _use_new_zipfile_serialization=not legacy)
        path.write_bytes(path.read_bytes()[:2000])
        with pytest.raises(WeightsError, match="damaged or not a checkpoint"):
            read_checkpoint(path)


def test_truncated_safetensors(tmp_path):
    path = save_weights(short_bc(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        read_checkpoint(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        read_checkpoint(tmp_path / "w.onnx")


def test_file_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    path = save_weights(short_bc(), tmp_path / "m.safetensors")
    model = short_bc(weights=path.as_uri())
    assert cached_path(path.as_uri()).is_relative_to(tmp_path / "cache")
    assert cached_path(path.as_uri()).exists()
    assert torch.equal(model.features.conv0.weight, load_model(path)[0].features.conv0.weight)


def test_safetensors_without_config_needs_a_name(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(short_bc().state_dict(), path)
    with pytest.raises(WeightsError, match="no model config"):
        load_model(path)
    assert short_bc(weights=path) is not None


PREPROCESSING = {"input_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def with_preprocessing(**changes):
    return json.dumps({"preprocessing": {**PREPROCESSING, **changes}})


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"config": "{not json"}, "metadata 'config' is not JSON"),
        ({"config": "[6, 12, 24]"}, "metadata 'config' is a JSON array, expected a JSON object"),
        ({"config": '{"growth_rate": "12"}'}, "growth_rate must be an integer >= 1, got '12'"),
        ({"config": '{"compression": "half"}'}, "compression must be a number, got 'half'"),
        ({"config": '{"block_config": 5}'}, "block_config must be a list of layer counts, got 5"),
        ({"meta": "{'preprocessing': 1}"}, "metadata 'meta' is not JSON"),
        ({"meta": '"text"'}, "metadata 'meta' is a JSON string, expected a JSON object"),
        ({"meta": '{"preprocessing": {"input_size": 32}}'}, "lacks resize_size, mean, std"),
        ({"meta": with_preprocessing(input_size="32")}, "input_size must be an integer >= 1"),
        ({"meta": with_preprocessing(input_size=0)}, "input_size must be an integer >= 1, got 0"),
        ({"meta": with_preprocessing(resize_size=100000)}, "100000 px, more than the 2048 allowed"),
        ({"meta": with_preprocessing(std=[0.5, 0, 0.5])}, "std[1] must be a finite number > 0"),
        ({"meta": with_preprocessing(mean=None)}, "mean must be a list of numbers, got None"),
        ({"meta": with_preprocessing(mean=[0.5], std=[0.5])}, "the model takes 3 channels"),
        ({"meta": with_preprocessing(interpolation="lanczos")}, "interpolation must be one of"),
        ({"meta": '{"class_names": 5}'}, "class_names must be a list of strings, got 5"),
        ({"meta": '{"class_names": ["a"]}'}, "1 names for a model with 3 outputs"),
    ],
)
def test_bad_metadata_is_one_line_naming_the_file_and_the_field(
    tmp_path, capsys, metadata, message
):
    model = short_bc(num_classes=3)
    path = tmp_path / "m.safetensors"
    stored = {"config": json.dumps(model.config.to_dict()), "meta": with_preprocessing()}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        path,
        metadata={**stored, **metadata},
    )
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    assert main(["predict", str(image), "--weights", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"densenet predict: error: {path}: metadata ")
    assert message in error and error.count("\n") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        # The file: 190 KB whose config asked for a 5 GB network, built before checking.
        (
            {"block_config": [100000] * 3},
            "metadata 'config' is invalid: this architecture has 18,841,785,601,162 parameters",
        ),
        (
            {"block_config": [60, 60, 60]},
            "asks for 180 dense layers, but the file holds only 92 tensors",
        ),
        # As many layers as the file has, each 50 times too wide: checked shapes-only first.
        ({"growth_rate": 600}, "conv2.weight (12, 48, 3, 3) vs model (600, 2400, 3, 3)"),
    ],
)
def test_a_config_is_checked_against_the_tensors_before_the_network_is_built(
    tmp_path, change, message
):
    model = short_bc()
    path = tmp_path / "m.safetensors"
    config = {**model.config.to_dict(), **change}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={"config": json.dumps(config)})
    with pytest.raises(WeightsError, match=re.escape(message)):
        load_model(path)
