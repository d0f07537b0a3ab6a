"""Signals at a chosen training step, the same on every machine.

Polling for a checkpoint and then signalling races the run: on an idle machine a tiny run can
finish between two polls. Here the process signals itself as the chosen step begins.
"""

import csv
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from densenet.cli import main
from densenet.training.metrics import EpochRow

# What must not differ between two runs that compute the same thing (timings may).
EXACT_COLUMNS = [c for c in EpochRow.columns() if c not in ("img_per_s", "seconds", "data_share")]

_SCRIPT = """
import os, signal, sys
from densenet.cli import main
from densenet.training import loop

at_step, sig, calls, take_step = int(sys.argv[1]), int(sys.argv[2]), [0], loop.train_step

def train_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at_step:
        os.kill(os.getpid(), sig)
    return take_step(*args, **kwargs)

loop.train_step = train_step
sys.exit(main(sys.argv[3:]))
"""


def train_signalled_at(
    step: int, sig: signal.Signals, *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run ``densenet train ARGV`` in a process that gets ``sig`` as its ``step``-th step (1-based)
    begins."""
    command = [sys.executable, "-c", _SCRIPT, str(step), str(int(sig)), "train", *argv]
    return subprocess.run(command, capture_output=True, text=True)


def train_killed_at(step: int, *argv: str) -> int:
    """``kill -9`` as the ``step``-th step begins; returns the exit status."""
    return train_signalled_at(step, signal.SIGKILL, *argv).returncode


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def killed_and_resumed(tmp_path: Path, args: list[str], step: int) -> tuple[Path, Path, dict]:
    """``densenet train ARGS`` run whole, and again killed with ``kill -9`` as its ``step``-th step
    begins (a state saved after every step), then resumed. Returns the two run directories and
    the state the killed run had left."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", "--out", str(whole), *args]) == 0
    status = train_killed_at(step, "--out", str(killed), *args, "--checkpoint-every", "1")
    assert status == -signal.SIGKILL
    state = torch.load(killed / "last.pt", weights_only=True)
    assert not (killed / "final.safetensors").exists()
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    return whole, killed, state


def assert_identical_runs(first: Path, second: Path, weights: tuple[str, ...]) -> None:
    """The same ``weights`` files, bit for bit, and the same metrics but for timings."""
    for name in weights:
        expected, got = load_file(first / name), load_file(second / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    exact = lambda rows: [[row[c] for c in EXACT_COLUMNS] for row in rows]  # noqa: E731
    assert exact(read_metrics(first)) == exact(read_metrics(second))
