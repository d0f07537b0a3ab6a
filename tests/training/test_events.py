"""``densenet train --tensorboard``: event files that agree with metrics.csv and the schedule, and
that a stopped and resumed run continues without repeating a step."""

import csv
import signal
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from architectures import TINY_TRAIN_FLAGS
from densenet.cli import main
from densenet.training.config import load_config
from densenet.training.metrics import EpochRow
from killing import train_signalled_at

# Digits with a tiny network: 22 steps of 64 an epoch (the last partial batch is dropped).
TINY = [*TINY_TRAIN_FLAGS, "--precision", "fp32", "--no-progress", "--batch-size", "64"]
STEPS = 22


def train(run, *extra):
    return main(["train", "--out", str(run), *TINY, "--tensorboard", *extra])


def read_events(run) -> EventAccumulator:
    # Size 0 keeps every event: by default TensorBoard samples long series.
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    return events.Reload()


def series(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def scheduled_lrs(run, updates: int) -> list[float]:
    config = load_config(run / "config.toml")
    return [config.lr * config.lr_factor(update, STEPS) for update in range(updates)]


def test_events_hold_the_metrics_the_schedule_and_the_curves(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2", "--schedule", "cosine", "--warmup-epochs", "0.5") == 0
    events = read_events(run)
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))

    # Per epoch, at the optimizer steps done by its end: every number of its metrics.csv row.
    numbers = [c for c in EpochRow.columns() if c not in ("epoch", "ema_test_top1")]
    for column in numbers:
        steps, values = series(events, f"epoch/{column}")
        assert steps == [STEPS, 2 * STEPS]
        assert values == pytest.approx([float(row[column]) for row in rows], rel=1e-6)
    assert "epoch/ema_test_top1" not in events.Tags()["scalars"]  # no weight average here

    # The lr of every optimizer step, as the schedule gives it.
    steps, lrs = series(events, "step/lr")
    assert steps == list(range(1, 2 * STEPS + 1))
    assert lrs == pytest.approx(scheduled_lrs(run, 2 * STEPS), rel=1e-6)

    # Train loss and top-1 where the loop reads its sums: every 16 steps and at the epoch end.
    # Each is the mean over its window, so the windows weighted by their batches give the epoch's.
    read_at = [16, STEPS, STEPS + 16, 2 * STEPS]
    for tag, column in (("step/train_loss", "train_loss"), ("step/train_top1", "train_top1")):
        steps, values = series(events, tag)
        assert steps == read_at
        for epoch, row in enumerate(rows):
            (first, last) = values[2 * epoch : 2 * epoch + 2]
            mean = (16 * first + (STEPS - 16) * last) / STEPS
            assert mean == pytest.approx(float(row[column]), rel=1e-5)
    assert all(value > 0 for value in series(events, "step/img_per_s")[1])

    curves = events.Images("curves")
    assert [image.step for image in curves] == [STEPS, 2 * STEPS]
    assert (curves[-1].width, curves[-1].height) == (1000, 400)  # curves.png's size


def test_a_run_stopped_after_its_last_save_resumes_each_series_without_repeats(tmp_path):
    run = tmp_path / "run"
    flags = ("--out", str(run), *TINY, "--tensorboard", "--epochs", "2", "--checkpoint-every", "5")
    # Ctrl-C as step 8 begins: the state of step 5 is saved, and closing the writer puts the lr
    # of steps 6 and 7 on disk too. The resumed run takes those steps again.
    result = train_signalled_at(8, signal.SIGINT, *flags)
    assert result.returncode == 130, result.stderr
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0

    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per process
    events = read_events(run)
    steps, lrs = series(events, "step/lr")
    assert steps == list(range(1, 2 * STEPS + 1))
    assert lrs == pytest.approx(scheduled_lrs(run, 2 * STEPS), rel=1e-6)
    # The sums are read at every save too: each read once, in order.
    read_at = series(events, "step/train_loss")[0]
    assert read_at == sorted(set(read_at)) and {16, STEPS, STEPS + 16, 2 * STEPS} <= set(read_at)
    assert series(events, "epoch/test_top1")[0] == [STEPS, 2 * STEPS]


def test_tensorboard_without_its_package_is_one_line_and_leaves_no_run(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    run = tmp_path / "run"
    assert train(run, "--epochs", "1") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "--tensorboard needs the tensorboard package: pip install 'densenet[tensorboard]'"
    )
    assert len(error.splitlines()) == 1
    assert not run.exists()
