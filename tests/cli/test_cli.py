import argparse
import os
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model-override", "block_config=3"], "block_config must be a list"),
        (["train", "--model-override", "compression=x"], "compression must be a number"),
        (["train", "--model-override", "compression=0.001"], "each needs at least 1"),
        (["train", "--model-override", "growth_rate=100000000"], "more than the 268,435,456"),
        (["train", "--recipe", "{tmp}/latin1.toml"], "latin1.toml is not UTF-8 text"),
        (["train", "--recipe", "{tmp}/overrides.toml"], "model_overrides must be a table"),
        (["train", "--lr-gamma", "-1"], "lr_gamma must be in (0, 1], got -1.0"),
        (["train", "--std", "inf"], "std must be finite numbers > 0, got [inf]"),
        (["eval", "--weights", "w", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        (["eval", "--weights", "w", "--workers", "-1"], "--workers: must be an integer >= 0"),
        (["summary", "densenet40_k12", "--batch", "-1"], "--batch: must be an integer >= 1"),
        (["convert", "w", "-o", "{tmp}/file/w.safetensors"], "inside {tmp}/file, which is a file"),
        (["convert", "w", "-o", "{tmp}/ro/new/w.safetensors"], "cannot write in {tmp}/ro (read-"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_is_written(
    argv, message, tmp_path, monkeypatch, capsys
):
    (tmp_path / "latin1.toml").write_bytes('model = "café"'.encode("latin-1"))
    (tmp_path / "overrides.toml").write_text("model_overrides = 5")
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir(mode=0o555)
    # Root may write anywhere: answer as the kernel does for anyone else.
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != tmp_path / "ro" and access(p, mode))
    run = tmp_path / "run"
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if argv[0] == "train":
        argv += ["--out", str(run)]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's errors
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2 and error.startswith(f"densenet {argv[0]}: error: ")
    assert message.format(tmp=tmp_path) in error and len(error.strip().splitlines()) == 1
    assert not run.exists()


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
    assert choice_fields == {
        "dataset", "augment", "interpolation", "precision", "memory_format", "task", "pos_weight",
        "schedule", "optimizer", "auto_augment",
    }  # fmt: skip
