"""A run is never lost or mixed up: claimed directories, foreign directories, resume checks, errors
before anything is written, preemption, full disks."""

import errno
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from densenet.cli import main
from densenet.errors import WriteError
from densenet.files import atomic_write
from densenet.training import state as state_module
from densenet.training.preemption import StopRequests
from densenet.training.rundir import RunDirectory
from killing import train_signalled_at

# Digits with a tiny network: 22 steps of 64 an epoch, a few milliseconds each.
TINY = [
    *("--model-override", "block_config=[1,1,1]", "--model-override", "growth_rate=4"),
    *("--precision", "fp32", "--no-progress", "--batch-size", "64", "--epochs", "1"),
]
# Long enough for a signal to arrive mid-run: 2 epochs of 89 steps of 16 (1437 images).
LONGER = ("--batch-size", "16", "--epochs", "2")


def train(run, *extra):
    return main(["train", "--out", str(run), *TINY, *extra])


def test_a_claimed_directory_is_refused_naming_the_process(tmp_path, capsys):
    run = tmp_path / "run"
    other = RunDirectory(run)
    other.create()  # as another training process would, holding the claim
    assert train(run) == 2
    error = capsys.readouterr().err
    assert f"{run} is in use by process {os.getpid()}" in error
    other.release()


def test_a_claim_left_by_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RunDirectory.LOCK).write_text("process 1 on elsewhere\n")  # its holder is gone
    assert train(run) == 0
    assert not (run / RunDirectory.LOCK).exists()


def test_two_default_names_in_the_same_second_are_two_directories(tmp_path):
    first = RunDirectory.new_default(tmp_path, "digits-x-20260101-120000")
    second = RunDirectory.new_default(tmp_path, "digits-x-20260101-120000")
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()


def test_a_directory_that_is_not_a_run_is_never_written_into(tmp_path, capsys):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "metrics.csv").write_text("keep\n")
    assert train(mine) == 2
    assert "is not empty (metrics.csv) and is not a densenet run" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv"]
    assert (mine / "metrics.csv").read_text() == "keep\n"


def test_the_writability_probe_leaves_user_files_alone(tmp_path):
    (tmp_path / ".write-test").write_text("mine")
    RunDirectory.check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-test"]


def test_resume_refuses_results_without_a_state(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    (run / "last.pt").unlink()
    final = (run / "final.safetensors").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "has results (metrics.csv, best.safetensors, final.safetensors) but no last.pt" in (
        capsys.readouterr().err
    )
    assert (run / "final.safetensors").read_bytes() == final


def test_resume_refuses_an_edited_training_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2") == 0
    config = run / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.1\n", "lr = 0.05\n"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "config.toml no longer matches" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "4000"], "is larger than the 1437 training images"),
        (["--momentum", "0"], "nesterov needs momentum > 0"),
        (["--model", "densenet121"], "too small"),
    ],
)
def test_errors_found_before_training_leave_no_run(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not run.exists()
    assert train(run) == 0  # the same --out works once the settings are fixed


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")

    def full(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device; free"):
        atomic_write(path, full)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_a_full_disk_stops_training_in_one_line(tmp_path, monkeypatch, capsys):
    def full(data, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "_save", full)
    run = tmp_path / "run"
    assert train(run) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("No space left on device; free some space or write elsewhere")
    assert len(error.splitlines()) == 1 and not list(run.glob(".*tmp*"))


def test_a_save_killed_midway_leaves_nothing_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2", "--checkpoint-every", "1000") == 0
    leftover = run / ".last.12345.tmp.pt"
    leftover.write_bytes(b"half")
    (run / "last.pt").unlink()
    for name in ("metrics.csv", "best.safetensors", "final.safetensors"):
        (run / name).unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not leftover.exists()


def test_both_stop_signals_are_caught_while_training_and_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with StopRequests() as stops:
            os.kill(os.getpid(), sig)
            assert stops.received == sig.name
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preemption_saves_the_step_and_resumes_exactly(tmp_path):
    settings = ("--deterministic", "--drop-rate", "0.1", *LONGER)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train(whole, *settings) == 0
    # SIGTERM arrives as step 7 begins: that step finishes, is saved, and the run stops.
    result = train_signalled_at(7, signal.SIGTERM, "--out", str(stopped), *TINY, *settings)
    assert result.returncode == 75, result.stderr
    assert "stopped: SIGTERM at epoch 1 step 7/89: the run is saved" in result.stderr
    assert f"continue with: densenet train --resume {stopped}" in result.stderr
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 7)

    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0
    expected, got = load_file(whole / "final.safetensors"), load_file(stopped / "final.safetensors")
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_ctrl_c_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    result = train_signalled_at(
        8, signal.SIGINT, "--out", str(run), *TINY, *LONGER, "--checkpoint-every", "5"
    )
    assert result.returncode == 130
    assert (
        f"interrupted: the run is saved up to its last checkpoint; continue with: densenet "
        f"train --resume {run}" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_damaged_training_state_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2") == 0
    saved = torch.load(run / "last.pt", weights_only=True)
    del saved["optimizer"]  # the right format tag, a key missing
    torch.save(saved, run / "last.pt")
    for name in ("metrics.csv", "best.safetensors", "final.safetensors"):
        (run / name).unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("last.pt has no valid 'optimizer' (dict expected); it cannot be resumed")
    assert len(error.splitlines()) == 1
