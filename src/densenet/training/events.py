"""TensorBoard event files of a run (``--tensorboard``), in ``RUN/tensorboard``.

Their step axis is the number of optimizer steps done, so a resumed run continues the curves of
the run it resumes. A run killed after its last save may have written events past it: the resumed
run's file starts with a restart marker at the first step it takes again, and TensorBoard drops
what earlier files hold from that step on.

Steps don't wait for the device for these events either: the train loss and top-1 are logged where
the loop reads its running sums anyway, as means over the steps since the previous read. The lr of
each optimizer step is known on the host and logged at every one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from densenet.errors import require
from densenet.training.config import TrainConfig
from densenet.training.metrics import Row, Tally
from densenet.training.plots import curves_figure, render
from densenet.training.rundir import RunDirectory
from densenet.training.setup import updates_done, updates_per_epoch
from densenet.training.state import TrainState

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

DIRECTORY = "tensorboard"
_NAME_PREFIX = "events.out.tfevents."


def check_available(config: TrainConfig) -> None:
    """Refuse ``--tensorboard`` without its package, before the run directory is written to."""
    if config.tensorboard:
        require("tensorboard", purpose="--tensorboard", extra="tensorboard")


class RunEvents:
    """What a run logs to TensorBoard; with ``writer`` None (the option off, or a process other
    than the main one) it logs nothing."""

    def __init__(
        self, writer: SummaryWriter | None, config: TrainConfig, steps: int, multilabel: bool
    ) -> None:
        self._writer = writer
        self._config, self._steps, self._multilabel = config, steps, multilabel
        self._since = Tally()  # the sums, and the time, at the previous logged read
        self._since_time = time.perf_counter()

    @classmethod
    def open(
        cls,
        config: TrainConfig,
        run: RunDirectory,
        state: TrainState,
        steps: int,
        multilabel: bool,
        resume: bool,
    ) -> RunEvents:
        """The events of ``run`` from ``state`` on: a new event file on the main process, if
        ``--tensorboard``."""
        if not (config.tensorboard and run.writes):
            return cls(None, config, steps, multilabel)
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is optional

        directory = run / DIRECTORY
        _after_earlier_files(directory)
        # Everything an earlier attempt logged after the saved state is logged again from here.
        done = updates_done(config, state.epoch, state.step, steps)
        writer = SummaryWriter(str(directory), purge_step=done + 1 if resume else None)
        return cls(writer, config, steps, multilabel)

    def __enter__(self) -> RunEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()  # however the run ends, what it logged is on disk

    def start_window(self, state: TrainState) -> None:
        """Measure the next step means from ``state``'s sums (a new epoch's, or a resumed one's)."""
        self._since, self._since_time = state.tally, time.perf_counter()

    def step(self, state: TrainState, synced: bool) -> None:
        """After an optimizer step: its lr, and, if the loop has just read its sums (``synced``),
        the means over the batches since the previous logged read."""
        if self._writer is None:
            return
        done = updates_done(self._config, state.epoch, state.step, self._steps)
        per_epoch = updates_per_epoch(self._config, self._steps)
        lr = self._config.lr * self._config.lr_factor(done - 1, per_epoch)
        self._writer.add_scalar("step/lr", lr, done)
        images = state.tally.images - self._since.images
        if not synced or not images:
            return  # with nothing read since, the window goes on to the next read
        seconds = max(time.perf_counter() - self._since_time, 1e-9)
        self._writer.add_scalar("step/img_per_s", images / seconds, done)
        self._writer.add_scalar(
            "step/train_loss", (state.tally.loss_sum - self._since.loss_sum) / images, done
        )
        if not self._multilabel:  # multi-label batches have no top-1
            top1 = 100 * (state.tally.top1 - self._since.top1) / images
            self._writer.add_scalar("step/train_top1", top1, done)
        self.start_window(state)

    def epoch(self, state: TrainState) -> None:
        """After an epoch's row joined ``state``'s history: every number of its metrics.csv row,
        and the curves so far."""
        if self._writer is None:
            return
        row: Row = state.history[-1]
        done = updates_done(self._config, state.epoch, 0, self._steps)
        for column, value in row.csv_row().items():
            if column != "epoch" and value is not None:
                self._writer.add_scalar(f"epoch/{column}", value, done)
        figure = render(curves_figure(state.history))
        self._writer.add_image("curves", figure, done, dataformats="HWC")

    def flush(self) -> None:
        """Put what is logged on disk: called before each save of the state, so that a resumed run
        finds every event up to its state."""
        if self._writer is not None:
            self._writer.flush()


def _after_earlier_files(directory: Path) -> None:
    """Wait until a new event file sorts after the ones there: TensorBoard reads them in name
    order, and a name starts with the second its file was made (a kill and resume can fall in
    one second)."""
    seconds = [
        int(path.name[len(_NAME_PREFIX) :].split(".")[0])
        for path in directory.glob(_NAME_PREFIX + "*")
    ]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)
