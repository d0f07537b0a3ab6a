"""End-to-end CLI tests of train / resume / eval on tiny data (a few steps each)."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

import densenet
from architectures import TINY_TRAIN_FLAGS
from densenet.cli import main
from densenet.data.datasets import load_split
from densenet.data.loaders import Normalize
from densenet.training.loop import SYNC_STEPS
from densenet.training.metrics import DeviceTally, EpochRow
from fake_data import write_cifar, write_image_folder
from killing import assert_identical_runs, killed_and_resumed, read_metrics

TINY = [*TINY_TRAIN_FLAGS, "--precision", "fp32", "--no-progress"]
METRICS = EpochRow.columns()


@pytest.fixture
def cifar(tmp_path):
    write_cifar(tmp_path / "data")
    return tmp_path / "data"


def train_cifar(cifar, run, *extra):
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(cifar), "--out", str(run)]
    return main([*argv, "--epochs", "2", "--batch-size", "8", *TINY, *extra])


def test_train_writes_a_complete_run_and_eval_agrees(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--checkpoint-every", "3") == 0
    names = {p.name for p in run.iterdir()}
    assert names == {
        "config.toml",
        "metrics.csv",
        "curves.png",
        "last.pt",
        "best.safetensors",
        "final.safetensors",
    }
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"] and list(rows[0]) == list(METRICS)
    assert float(rows[0]["img_per_s"]) > 0 and 0 <= float(rows[0]["data_share"]) < 1
    assert Image.open(run / "curves.png").size[0] > 500

    # The weights carry what `densenet predict` needs.
    model, checkpoint = densenet.load_model(run / "final.safetensors")
    meta = checkpoint.meta
    assert meta["model"] is None and meta["dataset"] == "cifar10" and meta["in_channels"] == 3
    assert meta["class_names"] == [f"class{i}" for i in range(10)]
    preprocessing = densenet.Preprocessing.from_dict(meta["preprocessing"])
    assert (preprocessing.input_size, preprocessing.resize_size) == (32, 32)
    assert preprocessing.mean == pytest.approx((0.491373, 0.482353, 0.446667))

    capsys.readouterr()
    assert main(["eval", "--weights", str(run / "final.safetensors"), "--dataset", "cifar10",
                 "--data-dir", str(cifar), "--precision", "fp32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"top-1 {float(rows[-1]['test_top1']):.2f}%" in out
    assert "per-class top-1" in out and "class9" in out
    assert (run / "confusion-cifar10-test.png").is_file()
    assert (run / "per_class-cifar10-test.csv").read_text().startswith("class,top1,images")

    # Predicting a test image from a PNG file through the stored preprocessing gives exactly the
    # logits evaluation computed from the in-memory tensor.
    image = load_split("cifar10", cifar, "test").images[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    via_file = transforms.Compose(
        [
            transforms.Resize(preprocessing.resize_size),
            transforms.CenterCrop(preprocessing.input_size),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )(Image.open(tmp_path / "x.png").convert("RGB"))
    model.eval()
    with torch.no_grad():
        in_memory = Normalize(preprocessing.mean, preprocessing.std)(image[None])
        assert torch.equal(model(via_file[None]), model(in_memory))


def test_sigkill_mid_epoch_then_resume_gives_bitwise_identical_weights(tmp_path):
    # Digits: 5 steps of 256 per epoch; dropout and augmentation make every step random.
    args = [
        *("--epochs", "2", "--batch-size", "256", "--deterministic", "--drop-rate", "0.1"),
        *TINY_TRAIN_FLAGS,
        *("--precision", "fp32", "--no-progress"),
    ]
    # Killed as step 4 of epoch 1 begins: the state of step 3 was saved, nothing after it.
    whole, killed, state = killed_and_resumed(tmp_path, args, 4)
    assert (state["epoch"], state["step"]) == (0, 3)
    assert_identical_runs(whole, killed, ("final.safetensors",))


def test_missing_dataset_fails_in_one_line_and_leaves_no_run(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "densenet", "train", "--dataset", "cifar10", "--data-dir",
         str(tmp_path), "--out", str(run)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path}/cifar-10-batches-py/data_batch_1" in lines[0]
    assert "--download" in lines[0] and not run.exists()


def test_unwritable_output_is_refused_before_training(cifar, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert train_cifar(cifar, tmp_path / "a-file" / "run") == 2
    assert "cannot write to" in capsys.readouterr().err


def test_an_existing_run_is_never_overwritten(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--epochs", "1") == 0
    before = (run / "final.safetensors").read_bytes()
    assert train_cifar(cifar, run, "--epochs", "1") == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert (run / "final.safetensors").read_bytes() == before


def test_resume_refuses_another_model_and_a_truncated_checkpoint(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--epochs", "1") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--model", "densenet40_k12"]) == 2
    assert "cannot resume with different settings (model" in capsys.readouterr().err
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "last.pt is truncated or corrupt" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--lr", "1e30", "--checkpoint-every", "1") == 2
    error = capsys.readouterr().err
    assert "at epoch 1 step" in error and "the last good checkpoint" in error
    state = torch.load(run / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "final.safetensors").exists()


def test_unreadable_images_in_an_image_folder_are_skipped_and_counted(tmp_path, capsys):
    write_image_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    argv += ["--out", str(run), "--epochs", "1", "--batch-size", "9"]
    argv += ["--input-size", "32", "--resize-size", "37"]
    assert main([*argv, "--workers", "0", *TINY]) == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
    assert read_metrics(run)[0]["skipped_images"] == "1"
    meta = densenet.load_model(run / "final.safetensors")[1].meta
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["preprocessing"]["resize_size"] == 37 and meta["model"] is None

    weights = str(run / "final.safetensors")
    argv = ["eval", "--weights", weights, "--dataset", "imagefolder", "--split", "train"]
    assert (
        main([*argv, "--data-dir", str(tmp_path / "data"), "--workers", "0", "--precision", "fp32"])
        == 0
    )
    out = capsys.readouterr().out
    assert "(8 images, fp32)" in out and "1 unreadable images were skipped" in out
    assert (run / "confusion-imagefolder-train.png").is_file()


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_epoch_in_which_no_image_could_be_read_stops_the_run(tmp_path, capsys, split):
    write_image_folder(tmp_path / "data")
    for path in (tmp_path / "data" / split).rglob("*.png"):
        path.write_bytes(b"\x89PNG truncated")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    argv += ["--out", str(run), "--epochs", "1", "--batch-size", "4"]
    argv += ["--input-size", "32", "--resize-size", "37", "--workers", "0"]
    assert main([*argv, *TINY]) == 2
    error = capsys.readouterr().err
    assert f"no image of {tmp_path / 'data' / split} could be read in epoch 1" in error
    assert "(8 unreadable files skipped)" in error and f"--resume {run}" in error
    assert not {"best.safetensors", "final.safetensors"} & {p.name for p in run.iterdir()}


def test_a_non_finite_test_loss_stops_the_run(tmp_path, capsys):
    # One full-batch step at lr 1e6 leaves finite weights whose BatchNorm statistics overflow in
    # evaluation: the training loss is finite, the test loss is not.
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--epochs", "2", "--batch-size", "1437", "--lr", "1e6"]
    assert main([*argv, *TINY]) == 2
    error = capsys.readouterr().err
    assert "the test loss is nan after epoch 1; training stopped and nothing was saved" in error
    assert {p.name for p in run.iterdir()} == {"config.toml"}


def test_a_one_epoch_run_trains_at_the_starting_lr(cifar, tmp_path):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--epochs", "1") == 0
    assert read_metrics(run)[0]["lr"] == "0.1"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(cifar, tmp_path, precision):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--epochs", "1", "--precision", precision) == 0
    assert f'precision = "{precision}"' in (run / "config.toml").read_text()
    assert float(read_metrics(run)[0]["test_loss"]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_resolves_precision_and_layout(cifar, tmp_path):
    run = tmp_path / "run"
    argv = ["--epochs", "1", "--device", "cuda", "--precision", "auto", "--memory-format", "auto"]
    assert train_cifar(cifar, run, *argv) == 0
    config = (run / "config.toml").read_text()
    assert 'device = "cuda"' in config and 'precision = "' in config


def test_svhn_recipe_trains_on_train_plus_extra_with_dropout(tmp_path, capsys):
    from fake_data import write_svhn

    write_svhn(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "svhn", "--data-dir", str(tmp_path / "data"), "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--batch-size", "8", *TINY]) == 0
    assert "on svhn: 24 train / 12 test images" in capsys.readouterr().out
    model, checkpoint = densenet.load_model(run / "final.safetensors")
    assert model.config.drop_rate == 0.2 and checkpoint.meta["preprocessing"]["std"] == [1.0] * 3


def test_memory_efficient_training_gives_the_same_run(cifar, tmp_path):
    # A small lr: at lr 0.1 on random data a few steps amplify float rounding chaotically (in
    # either path alike), which would hide what this checks: the flag reaches the model intact.
    standard, efficient = tmp_path / "standard", tmp_path / "efficient"
    settings = ("--deterministic", "--lr", "0.001")
    assert train_cifar(cifar, standard, *settings) == 0
    assert train_cifar(cifar, efficient, *settings, "--memory-efficient") == 0
    a = load_file(standard / "final.safetensors")
    b = load_file(efficient / "final.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5
    _, checkpoint = densenet.load_model(efficient / "final.safetensors")
    assert checkpoint.config.memory_efficient


def test_finetune_with_a_frozen_backbone_trains_only_the_head(cifar, tmp_path):
    pretrained = tmp_path / "pretrained"
    assert train_cifar(cifar, pretrained) == 0
    tuned = tmp_path / "tuned"
    source = pretrained / "final.safetensors"
    assert train_cifar(cifar, tuned, "--finetune", str(source), "--freeze-backbone") == 0
    before, after = load_file(source), load_file(tuned / "final.safetensors")
    # Frozen BN keeps no batch counter; every other backbone tensor must be untouched.
    backbone = [k for k in after if not k.startswith("classifier")]
    assert len(backbone) > 0.8 * len(before)
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    densenet.load_model(tuned / "final.safetensors")  # and the file loads as a normal model
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_finetune_options_that_cannot_work_are_refused(cifar, tmp_path, capsys):
    assert train_cifar(cifar, tmp_path / "a", "--freeze-backbone") == 2
    assert "--finetune" in capsys.readouterr().err
    missing = str(tmp_path / "missing.safetensors")
    assert train_cifar(cifar, tmp_path / "b", "--finetune", missing) == 2
    assert "not found" in capsys.readouterr().err


def count_reads(monkeypatch) -> list[int]:
    """Record every time the loop reads its running sums back from the device."""
    reads: list[int] = []
    original = DeviceTally.read

    def read(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(DeviceTally, "read", read)
    return reads


def test_steps_do_not_wait_for_the_device(tmp_path, monkeypatch):
    # Digits at batch 64: 22 steps an epoch. The sums are read at step 16 and at the end only.
    reads = count_reads(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--batch-size", "64", *TINY]) == 0
    assert len(reads) == 2 == 1 + 22 // SYNC_STEPS


def test_a_non_finite_loss_noticed_late_is_reported_at_its_step(tmp_path, monkeypatch, capsys):
    # lr 1e30: the first step's update blows the weights up, so the loss of step 2 is not finite.
    # It is noticed at the first read (step 16) and reported where it happened.
    reads = count_reads(monkeypatch)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--epochs", "1", "--batch-size", "8", "--lr", "1e30"]
    assert main([*argv, *TINY]) == 2
    assert len(reads) == 1
    error = capsys.readouterr().err
    assert "at epoch 1 step 2 (global step 2)" in error and "nothing was saved" in error
    assert not (run / "last.pt").exists()


def test_metrics_show_the_scheduled_lr_without_binary_noise(cifar, tmp_path):
    run = tmp_path / "run"
    assert train_cifar(cifar, run, "--lr-milestones", "0.5") == 0
    assert [row["lr"] for row in read_metrics(run)] == ["0.1", "0.01"]
