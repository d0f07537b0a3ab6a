"""Stopping a run cleanly when the cluster wants its machine back.

SLURM, Kubernetes and spot instances send SIGTERM (SLURM can send SIGUSR1 earlier, with
``--signal``) and kill the process some time later. While a run trains these signals only set a
flag: the loop finishes its step, saves its state and stops with exit status 75, to be resumed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from densenet.training.distributed import all_ranks_agree

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Catches the stop signals for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self._previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, ask: bool, device: torch.device) -> bool:
        """Whether to stop now. Under torchrun the processes decide together (a collective),
        so ``ask`` must be true at the same steps on every process; alone, asking is free."""
        if not ask:
            return False
        if not dist.is_initialized():
            return self.received is not None
        return not all_ranks_agree(self.received is None, device)
