import subprocess
import sys

import pytest

from densenet.cli import main


def test_list_shows_every_preset_with_paper_numbers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "7.98M" in out and "top1 25.02" in out
    assert "densenet_bc100_k12" in out and "0.77M" in out and "C10+ 4.51" in out


def test_summary_reports_table1_and_macs(capsys):
    assert main(["summary", "densenet121"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856 parameters" in out
    gmacs = float(out.split(" GMACs")[0].split()[-1])
    assert 2.83 <= gmacs <= 2.87
    for stage, size, channels in [
        ("denseblock1", "56x56", "256"),
        ("transition3", "7x7", "512"),
        ("denseblock4", "7x7", "1024"),
    ]:
        row = next(line for line in out.splitlines() if line.startswith(stage)).split()
        assert row[1:3] == [size, channels]


def test_summary_activation_memory_grows_with_batch(capsys):
    main(["summary", "densenet40_k12", "--batch", "1"])
    one = capsys.readouterr().out
    main(["summary", "densenet40_k12", "--batch", "4"])
    four = capsys.readouterr().out
    mb = lambda text: float(text.split(" MB activations")[0].split()[-1])  # noqa: E731
    assert mb(four) == pytest.approx(4 * mb(one), rel=0.05)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["summary", "densnet121"], "did you mean densenet121"),
        (["summary", "densenet121", "--input-size", "16", "16"], "at least 29 px"),
        (["summary", "densenet121", "--input-size", "100000", "9"], "larger than the 2048 px"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "densenet", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
