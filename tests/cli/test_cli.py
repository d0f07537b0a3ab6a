import argparse
import subprocess
import sys
import typing

import pytest

from densenet.cli import build_parser, main
from densenet.training.config import FIELD_TYPES, FIELDS


def test_list_shows_every_preset_with_paper_numbers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "7.98M" in out and "top1 25.02" in out
    assert "densenet_bc100_k12" in out and "0.77M" in out and "C10+ 4.51" in out


def test_summary_reports_table1_and_macs(capsys):
    assert main(["summary", "densenet121"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856 parameters" in out
    assert "2.834 GMACs per image at 224x224" in out
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


def test_train_flags_come_with_help_and_choices_from_the_config():
    subcommands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    actions = subcommands.choices["train"]._actions
    assert all(action.help for action in actions)
    by_setting = {action.dest: action for action in actions}
    choice_fields = set()
    for name, field in FIELDS.items():
        assert field.metadata["help"] == by_setting[name].help
        if typing.get_origin(FIELD_TYPES[name]) is typing.Literal:
            choice_fields.add(name)
            assert by_setting[name].choices == typing.get_args(FIELD_TYPES[name])
    assert choice_fields == {"dataset", "augment", "interpolation", "precision", "memory_format"}
