import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from architectures import TINY
from conftest import randomize_batchnorm
from densenet import ConfigError, DenseNet, save_weights
from densenet.cli import main
from densenet.deploy import export as export_module
from densenet.deploy.export import ExportError, export_model

SIZE = (40, 40)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batchnorm(DenseNet(**TINY)).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(model, path)
    return path, model


def _runtime_logits(path, format, x):
    """Run an exported file with its own runtime, independently of export_model's check."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    if format == "torchscript":
        return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


# fp32 exports run the same arithmetic as the eager model (1e-5 relative to the largest logit);
# bf16 rounds at every layer (0.93% on AVX-512, AVX2 and scalar kernels alike; see
# test_inference's BF16_TOLERANCE for the reasoning behind 2%).
@pytest.mark.parametrize(
    "format, precision, suffix, tolerance",
    [
        ("onnx", "fp32", ".onnx", 1e-5),
        ("torchscript", "fp32", ".pt", 1e-5),
        ("torchscript", "bf16", ".pt", 2e-2),
        ("exported-program", "fp32", ".pt2", 1e-5),
    ],
)
def test_round_trip_with_dynamic_batch(weights, tmp_path, format, precision, suffix, tolerance):
    _, model = weights
    path = tmp_path / f"model{suffix}"
    report = export_model(model, path, format, precision=precision, input_size=SIZE)
    assert report.relative_diff <= tolerance
    for batch in (1, 5):  # neither is the traced batch size
        x = torch.randn(batch, 3, *SIZE)
        with torch.no_grad():
            expected = model(x)
        actual = _runtime_logits(path, format, x).float()
        assert actual.shape == expected.shape
        assert ((actual - expected).abs().max() / expected.abs().max()).item() <= tolerance


def test_cli_exports_from_weights_and_prints_the_difference(weights, tmp_path, capsys):
    path, _ = weights
    output = tmp_path / "m.pt"
    argv = ["export", "--weights", str(path), "--format", "torchscript", "--output", str(output)]
    assert main([*argv, "--precision", "bf16", "--input-size", "40", "40"]) == 0
    printed = capsys.readouterr().out
    assert "max difference" in printed and output.is_file()


def test_cli_exports_a_preset(tmp_path, capsys):
    output = tmp_path / "m.pt"
    argv = ["export", "--model", "densenet_bc100_k12", "--format", "torchscript"]
    assert main([*argv, "--output", str(output)]) == 0
    assert output.is_file()


def _cli_error(argv, capsys):
    assert main(argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_unwritable_output_is_a_one_line_error(weights, tmp_path, capsys):
    path, _ = weights
    output = tmp_path / "missing" / "m.onnx"
    argv = ["export", "--weights", str(path), "--format", "onnx", "--output", str(output)]
    assert "does not exist" in _cli_error(argv, capsys)


@pytest.mark.parametrize(
    "missing, message",
    [
        (
            ["onnxruntime"],
            "ONNX export needs the onnxruntime package: pip install 'densenet[export]'",
        ),
        (["onnx", "onnxscript", "onnxruntime"], "the onnx, onnxscript and onnxruntime packages:"),
    ],
)
def test_missing_onnx_packages_are_named_with_the_install_command(
    weights, tmp_path, capsys, monkeypatch, missing, message
):
    path, _ = weights
    for package in missing:
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    output = tmp_path / "m.onnx"
    argv = ["export", "--weights", str(path), "--format", "onnx", "--output", str(output)]
    assert message in _cli_error(argv, capsys)
    assert not output.exists()


def test_weights_that_do_not_match_are_a_one_line_error(weights, tmp_path, capsys):
    path, _ = weights
    # A file that claims TINY's architecture but holds a bigger first convolution.
    tensors = load_file(path)
    tensors["features.conv0.weight"] = torch.zeros(16, 3, 7, 7)
    broken = tmp_path / "broken.safetensors"
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(header_size))["__metadata__"]
    save_file(tensors, broken, metadata=metadata)
    argv = ["export", "--weights", str(broken), "--format", "torchscript"]
    line = _cli_error([*argv, "--output", str(tmp_path / "m.pt")], capsys)
    assert "features.conv0.weight" in line


def test_an_input_size_beyond_the_limit_is_refused_before_running(weights, tmp_path, capsys):
    path, _ = weights
    argv = ["export", "--weights", str(path), "--format", "torchscript"]
    argv += ["--output", str(tmp_path / "m.pt"), "--input-size", "100000", "100000"]
    assert "larger than the 2048 px per side" in _cli_error(argv, capsys)
    assert not (tmp_path / "m.pt").exists()


def test_unknown_format_is_rejected(weights, tmp_path, capsys):
    path, model = weights
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--weights", str(path), "--format", "tflite", "--output", "m.tflite"])
    assert exit_info.value.code != 0
    assert "tflite" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(model, tmp_path / "m.tflite", "tflite")


@pytest.mark.parametrize(
    "format, precision, output, message",
    [
        ("onnx", "bf16", "m.onnx", "bfloat16"),
        ("exported-program", "fp32", "m.pt", r"\.pt2"),
        ("torchscript", "fp16", "m.pt", "precision"),
    ],
)
def test_unsupported_combinations_are_explained(
    weights, tmp_path, format, precision, output, message
):
    _, model = weights
    with pytest.raises(ConfigError, match=message):
        export_model(model, tmp_path / output, format, precision=precision, input_size=SIZE)


def test_an_export_that_computes_something_else_fails_loudly(weights, tmp_path, monkeypatch):
    _, model = weights
    write, load = export_module._FORMATS["torchscript"]

    def load_and_perturb(path):
        module = load(path)
        return lambda x: module(x) * 1.001

    monkeypatch.setitem(export_module._FORMATS, "torchscript", (write, load_and_perturb))
    (tmp_path / "m.pt").write_text("an earlier export")
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(model, tmp_path / "m.pt", "torchscript", input_size=SIZE)
    # The rejected file never replaced what was there, and no temporary file is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert (tmp_path / "m.pt").read_text() == "an earlier export"
