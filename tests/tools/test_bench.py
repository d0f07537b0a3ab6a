import pytest
import torch

from architectures import TINY
from conftest import randomize_batchnorm
from densenet import DenseNet
from densenet.cli import main
from densenet.tools.bench import torchvision_twin


def test_torchvision_twin_computes_the_same_function():
    model = randomize_batchnorm(DenseNet(**TINY)).eval()
    twin = torchvision_twin(model)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_no_twin_where_torchvision_cannot_express_the_model():
    assert torchvision_twin(DenseNet(growth_rate=4, block_config=(2,), stem="cifar")) is None


def test_bench_prints_and_writes_a_table(tmp_path, capsys):
    output = tmp_path / "bench.md"
    argv = [
        "bench",
        "densenet121",
        "--input-size",
        "32",
        "32",
        "--batch",
        "1",
        "--precision",
        "fp32",
    ]
    argv += ["--warmup", "0", "--rounds", "2", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "torch threads" in printed and "kernels" in printed and "bf16 in oneDNN" in printed
    written = output.read_text()
    assert "ours, optimize_for_inference" in written and "command: `densenet bench" in written
    rows = [line for line in written.splitlines() if line.startswith("| 1 |")]
    fastest, slowest = (float(ms) for ms in rows[0].split("|")[5].split("-"))
    median = float(rows[0].split("|")[4])
    assert fastest <= median <= slowest
    # Our plain model is timed against torchvision's run the same way.
    plain = next(row for row in rows if "ours, eager (fp32, channels_last)" in row)
    assert plain.split("|")[7].strip().endswith("x")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "--batch"),
        (["--threads", "0"], "--threads"),
        (["--rounds", "0"], "--rounds"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_bench_bad_input_is_one_line(extra, message, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "densenet_bc100_k12", *extra]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
