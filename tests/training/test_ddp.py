"""Data-parallel training and evaluation through torchrun: 2 CPU processes (gloo, loopback) on the
digits data.

With --sync-bn, fp32 and deterministic algorithms, 2 processes at half the batch each compute the
same steps as one process at the whole batch, up to float rounding: the data of every step (images,
order, augmentation) depends on (seed, epoch, step) only. Evaluation by 2 processes counts every
image once and gives one process's numbers.
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_modern import tiny_learner
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from architectures import TINY_TRAIN_FLAGS
from densenet.cli import main
from densenet.data import loaders
from densenet.data.datasets import load_split
from densenet.data.loaders import Batch, Normalize
from densenet.training.distributed import DistributedContext, distributed_session
from densenet.training.loop import train_step
from densenet.training.rundir import RunDirectory
from killing import read_metrics

ARGS = [
    # One epoch of 5 steps of 256 at a small lr. Training on digits amplifies float rounding
    # differences fast (BatchNorm over nearly constant channels, big gradients): a split batch's
    # 1e-7 after one step is about 1e-6 here but 1e-4 after 10 steps and 1e-2 after 22 steps at
    # batch 128 -- and one process run with 1 or with 2 threads differs as much, so longer runs
    # can't be compared at 1e-5 in fp32 (the tolerance).
    *("--epochs", "1", "--batch-size", "256", "--lr", "0.01"),
    # No warm-up (the digits recipe's is 1 epoch, halved here): its first steps at lr 0.004 and
    # 0.008 make one process and two differ by 1.8e-4 after these 5 steps (train loss still equal
    # to 1e-6), where the cosine alone keeps them within 1e-5.
    *("--warmup-epochs", "0"),
    *TINY_TRAIN_FLAGS,
    *("--precision", "fp32", "--deterministic", "--sync-bn", "--no-progress"),
]
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args: str, program: tuple[str, ...] = ("-m", "densenet")) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    loopback = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [*launcher, *loopback, *program, *args]


def kill_launch(process: subprocess.Popen) -> None:
    """End a torchrun launcher and its workers, which torchrun starts in sessions of their own."""
    pids = [*child_pids(process.pid), process.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    # The workers are not our children: wait until they are gone (and their run lock with them).
    deadline = time.monotonic() + 30
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)


def running(pid: int) -> bool:
    """A process that exists and has not exited (a zombie has closed its files)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for_lock(run: Path) -> None:
    """Until no process holds ``run``'s lock: a killed worker's files close as it exits."""
    lock, deadline = run / RunDirectory.LOCK, time.monotonic() + 60
    while lock.exists() and time.monotonic() < deadline:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)


def torchrun(
    *args: str, env: dict[str, str] | None = None, **options
) -> subprocess.CompletedProcess:
    """Run torchrun to the end; a launch still running after 3 minutes hangs: kill it and fail."""
    command = torchrun_command(*args, **options)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_launch(process)
        pytest.fail(f"{' '.join(command)} hung")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def max_difference(run_a, run_b) -> float:
    a, b = load_file(run_a / "final.safetensors"), load_file(run_b / "final.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command name: state, then the parent's pid.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return children


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "one"
    assert main(["train", "--out", str(run), *ARGS]) == 0
    return run


def test_two_processes_at_half_batch_equal_one_process(one_process, tmp_path):
    two = tmp_path / "two"
    result = torchrun("train", "--out", str(two), *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(one_process, two) <= TOLERANCE
    # Evaluation is sharded over the processes and summed: the same numbers as one process.
    for expected, got in zip(read_metrics(one_process), read_metrics(two), strict=True):
        assert float(got["test_loss"]) == pytest.approx(float(expected["test_loss"]), abs=1e-4)
        assert float(got["train_loss"]) == pytest.approx(float(expected["train_loss"]), abs=1e-4)
        assert got["test_top1"] == expected["test_top1"]
    # Only the main process prints (and writes).
    assert result.stdout.count("training ") == 1 and "x 2 processes" in result.stdout
    assert result.stdout.count("done: ") == 1


def test_memory_efficient_two_processes_equal_one_standard_process(one_process, tmp_path):
    # The memory-efficient blocks and transitions synchronise their own BatchNorm statistics and
    # backward sums: the same steps as one process on the standard path.
    two = tmp_path / "two-efficient"
    result = torchrun("train", "--out", str(two), *ARGS, "--memory-efficient")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(one_process, two) <= TOLERANCE


def test_compiled_ddp_training_follows_the_eager_run(one_process, tmp_path):
    # The DDP-wrapped module is compiled; its kernels round differently from eager ones (about
    # 1e-6 of the logits in one step), still within the eager runs' tolerance over these 5 steps.
    compiled = tmp_path / "compiled"
    result = torchrun("train", "--out", str(compiled), *ARGS, "--memory-efficient", "--compile")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile took" in result.stdout
    assert max_difference(one_process, compiled) <= TOLERANCE


def test_two_processes_checkpoint_and_one_process_resumes(one_process, tmp_path):
    killed = tmp_path / "killed"
    every_step = ["--checkpoint-every", "1"]
    process = subprocess.Popen(
        torchrun_command("train", "--out", str(killed), *ARGS, *every_step),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # one signal ends the launcher and both workers
    )
    checkpoint, deadline = killed / "last.pt", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:
        # Or the workers train on and write into the run directory while it is resumed.
        kill_launch(process)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] >= 2 and not (killed / "final.safetensors").exists()
    wait_for_lock(killed)

    # The checkpoint of 2 processes, finished by one.
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert max_difference(one_process, killed) <= TOLERANCE
    assert len(read_metrics(killed)) == 1


def test_a_diverging_run_stops_every_process_with_one_message(tmp_path):
    result = torchrun("train", "--out", str(tmp_path / "nan"), *ARGS, "--lr", "1e30")
    assert result.returncode != 0
    assert result.stderr.count("loss is nan on at least one process") == 1
    assert "process 1 stopped with the others; process 0 says why" in result.stderr


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_put_together_are_the_one_process_batches(train):
    data = load_split("digits", "data", "train" if train else "test")

    def batches(shard):
        made = loaders.TensorBatches(
            data, 96, torch.device("cpu"), train=train, augment="crop", padding=1, shard=shard
        )
        return list(made.epoch(1))

    whole = batches(loaders.Shard())
    parts = [batches(DistributedContext(rank, 3).data_shard) for rank in range(3)]
    # Disjoint, contiguous slices of every global batch, images augmented the same; the last
    # evaluation batch (360 = 3 * 96 + 72) splits too.
    for step, batch in enumerate(whole):
        assert torch.equal(batch.images, torch.cat([p[step].images for p in parts]))
        assert torch.equal(batch.labels, torch.cat([p[step].labels for p in parts]))


WORKER = str(Path(__file__).parent.parent / "ddp_worker.py")


def read_eval(out: Path, split: str = "train") -> dict:
    return json.loads((out / f"metrics-digits-{split}.json").read_text())


def test_two_process_eval_counts_every_image_once_as_one_process_does(one_process, tmp_path):
    # 1437 training digits in batches of 718: two full batches split 359 + 359, then one image
    # that process 0 evaluates alone while process 1's slice is empty.
    weights = str(one_process / "final.safetensors")
    argv = ["eval", "--weights", weights, "--split", "train", "--batch-size", "718"]
    argv += ["--precision", "fp32"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one)]) == 0
    # Process 1 is stopped at its first attempt to write anything under tmp_path.
    result = torchrun(
        *argv, "--out", str(two), program=(WORKER,), env={"DENSENET_TEST_NO_WRITES": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = read_eval(one), read_eval(two)
    assert got["images"] == expected["images"] == 1437
    assert got["confusion"] == expected["confusion"]
    assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert (two / "per_class-digits-train.csv").read_text() == (
        one / "per_class-digits-train.csv"
    ).read_text()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert result.stdout.count("top-1") == 2  # the summary and the per-class header, once each
    assert "(1437 images, fp32, 2 processes)" in result.stdout


def test_eval_failing_on_one_process_stops_both_with_one_message(one_process, tmp_path):
    # Process 1 is given a weights file that does not exist, as on a node without the file.
    weights = str(one_process / "final.safetensors")
    missing = str(tmp_path / "missing.safetensors")
    result = torchrun(
        *("eval", "--weights", weights, "--precision", "fp32", "--out", str(tmp_path / "out")),
        program=(WORKER,),
        env={"DENSENET_TEST_SWAP": f"{weights}={missing}"},
    )
    assert result.returncode != 0
    assert result.stderr.count("weights file not found") == 1
    assert f"process 1: weights file not found: {missing}" in result.stderr
    assert "process 1 stopped with the others; process 0 says why" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_one_process_torchrun_launch_starts_its_group(monkeypatch):
    # So that `torchrun --nproc_per_node 1` uses, and proves, the backend of a larger launch.
    environment = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for name, value in {**environment, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with distributed_session(torch.device("cpu")) as context:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (context.rank, context.world_size, context.enabled) == (0, 1, False)
    assert not dist.is_initialized()
    monkeypatch.delenv("RANK")
    with distributed_session(torch.device("cpu")):  # not launched by torchrun: no group
        assert not dist.is_initialized()


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo group of this process alone: DistributedDataParallel runs its all-reduce as with
    more processes, without launching any."""
    environment = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**environment, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    with distributed_session(torch.device("cpu")):
        yield


def test_accumulation_under_ddp_all_reduces_once_per_optimizer_step(one_process_group):
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    normalize = Normalize((0.3,), (0.4,))

    def trained_in(parts: int) -> tuple[list[torch.Tensor], int]:
        """The weights after one optimizer step over the 12 images in ``parts`` batches, and how
        many buckets DDP all-reduced for it."""
        # Same initial weights each time; BatchNorm in eval mode, so a batch's loss is the mean
        # of its images' losses and the parts add up to the whole batch exactly.
        learner, config = tiny_learner(accumulate=parts)
        ddp = DistributedDataParallel(learner.model)
        reduced = []

        def counting(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            reduced.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        for i, part in enumerate(torch.arange(12).split(12 // parts)):
            update = i == parts - 1
            batch = Batch(images[part], labels[part])
            train_step(ddp, learner, batch, config, normalize, 0, False, 1 / parts, update)
        return [p.detach().clone() for p in learner.model.parameters()], len(reduced)

    whole, reduced_whole = trained_in(1)
    accumulated, reduced_accumulated = trained_in(2)
    # The tolerance of test_modern's accumulation test without DDP.
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(accumulated, whole, strict=True))
    # The first batch's backward ran in no_sync: only the second one all-reduced its buckets.
    assert reduced_accumulated == reduced_whole >= 1
