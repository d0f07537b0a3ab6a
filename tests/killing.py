"""Signals at a chosen training step, the same on every machine.

Polling for a checkpoint and then signalling races the run: on an idle machine a tiny run can
finish between two polls. Here the process signals itself as the chosen step begins.
"""

import signal
import subprocess
import sys

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
