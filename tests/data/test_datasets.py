import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from densenet.data import datasets
from densenet.data.datasets import load_split
from densenet.data.images import eval_transform
from densenet.data.loaders import Normalize, Shard, TensorBatches, crop_and_flip
from densenet.errors import ConfigError, DatasetError, MissingPackageError
from densenet.models.presets import Preprocessing
from fake_data import write_cifar, write_image_folder, write_svhn


@pytest.mark.parametrize("name, classes, train_size", [("cifar10", 10, 40), ("cifar100", 100, 8)])
def test_cifar_pickles_load_as_uint8_tensors(tmp_path, name, classes, train_size):
    folder = write_cifar(tmp_path, name)
    train = load_split(name, tmp_path, "train")
    test = load_split(name, tmp_path, "test")
    assert train.images.shape == (train_size, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 8 and len(train.class_names) == classes
    # The first image is the first row of the first batch, reshaped channel-first.
    with open(folder / ("data_batch_1" if name == "cifar10" else "train"), "rb") as handle:
        first = pickle.load(handle, encoding="latin1")["data"][0]
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(first))


def test_svhn_mat_files_map_label_10_to_digit_0_and_add_extra(tmp_path):
    write_svhn(tmp_path)
    train = load_split("svhn", tmp_path, "train")
    assert len(train) == 24  # train + extra
    assert len(load_split("svhn", tmp_path, "train", svhn_extra=False)) == 12
    test = load_split("svhn", tmp_path, "test")
    assert test.labels.tolist() == [(i % 10 + 1) % 10 for i in range(12)]
    assert test.images.shape == (12, 3, 32, 32)


def test_svhn_without_scipy_is_named_with_the_install_command(tmp_path, monkeypatch):
    from densenet.data.datasets import download

    write_svhn(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy", None)  # import fails as if not installed
    message = r"SVHN's MATLAB files needs the scipy package: pip install 'densenet\[svhn\]'"
    with pytest.raises(MissingPackageError, match=message):
        load_split("svhn", tmp_path, "test")
    with pytest.raises(MissingPackageError, match=message):  # before anything is fetched
        download("svhn", tmp_path)


def test_digits_split_is_stratified_and_fixed():
    train, test = load_split("digits", "unused", "train"), load_split("digits", "unused", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    counts = torch.bincount(test.labels)
    assert counts.min() >= 35 and counts.max() <= 37  # every class about 20% held out
    assert torch.equal(load_split("digits", "unused", "test").images, test.images)


def test_image_folder_lists_classes(tmp_path):
    write_image_folder(tmp_path)
    data = load_split("imagefolder", tmp_path, "train")
    assert data.class_names == ["cat", "dog"] and len(data) == 8


def test_directory_links_inside_a_class_folder_are_not_followed(tmp_path):
    write_image_folder(tmp_path)
    cat = tmp_path / "train" / "cat"
    (cat / "up").symlink_to("..")  # would list the dog images again, labelled cat, many times
    (cat / "self").symlink_to(".")  # would list forever
    (cat / "linked.png").symlink_to(tmp_path / "val" / "cat" / "0.png")  # a file link is fine
    data = load_split("imagefolder", tmp_path, "train")
    assert data.class_names == ["cat", "dog"] and len(data) == 9
    assert all((f"{tmp_path}/train/cat/" in path) == (label == 0) for path, label in data.samples)


@pytest.mark.parametrize("target", [".", ".."])
def test_a_class_folder_that_leads_back_to_the_split_is_refused(tmp_path, target):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "bird").symlink_to(target)
    with pytest.raises(DatasetError, match=r"train/bird leads to .* which holds .*/train itself"):
        load_split("imagefolder", tmp_path, "train")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("svhn", "train_32x32.mat"),
        ("imagefolder", "train/CLASS_NAME"),
    ],
)
def test_missing_dataset_names_the_expected_path_and_the_fix(tmp_path, name, expected):
    with pytest.raises(DatasetError) as info:
        load_split(name, tmp_path, "train")
    message = str(info.value)
    assert f"{tmp_path}/{expected}" in message
    assert "--download" in message or name == "imagefolder"


def test_corrupt_dataset_files_are_reported(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="data_batch_3 is corrupt"):
        load_split("cifar10", tmp_path, "train")
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=r"test_32x32\.mat is corrupt"):
        load_split("svhn", tmp_path / "svhn", "test")


ROWS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize(
    "file, content, message",
    [
        (
            "test_batch",
            {"data": None},
            "'data' must be a uint8 array of 3072 pixels a row, got None",
        ),
        ("test_batch", {"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}, "shape (2, 5)"),
        ("test_batch", {"data": ROWS.astype(np.int64), "labels": [0, 1]}, "a int64 array"),
        ("test_batch", {"data": ROWS, "labels": None}, "'labels' must be a list of integer labels"),
        ("test_batch", {"data": ROWS, "labels": ["cat", "dog"]}, "integer labels, got ['cat'"),
        ("test_batch", {"data": ROWS, "labels": [0, [1]]}, "integer labels, got [0, [1]]"),
        ("test_batch", {"data": ROWS, "labels": [0]}, "2 images, 1 labels"),
        ("batches.meta", {"label_names": None}, "'label_names' must be a list of class names"),
    ],
)
def test_malformed_cifar_batches_name_the_file_and_the_field(tmp_path, file, content, message):
    folder = write_cifar(tmp_path)
    with open(folder / file, "wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(DatasetError) as error:
        load_split("cifar10", tmp_path, "test")
    assert str(error.value).startswith(f"{folder / file} is corrupt")
    assert message in str(error.value)


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    folder = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": []}, handle)
    with pytest.raises(DatasetError, match=r"refusing to load builtins\.print"):
        load_split("cifar10", tmp_path, "test")


def test_batch_crop_and_flip_matches_a_per_image_reference():
    images = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    out = crop_and_flip(images, 2, True, torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (6,), generator=draws)
    dx = torch.randint(0, 5, (6,), generator=draws)
    mirrored = torch.rand(6, generator=draws) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        expected = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7]
        assert torch.equal(out[i], expected.flip(2) if mirrored[i] else expected)
    assert mirrored.any() and not mirrored.all()  # both branches were exercised


def test_batches_depend_only_on_seed_epoch_and_step():
    data = load_split("digits", "unused", "test")
    batches = TensorBatches(data, 32, torch.device("cpu"), train=True, seed=5, augment="crop",
                            padding=1)  # fmt: skip
    full = list(batches.epoch(2))
    resumed = list(batches.epoch(2, start_step=4))
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_epoch = next(batches.epoch(3))
    assert not torch.equal(other_epoch.labels, full[0].labels)


def test_normalize_is_bitwise_totensor_then_normalize():
    pixels = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    preprocessing = Preprocessing(32, 36, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    cropped = eval_transform(preprocessing)(torch.from_numpy(pixels).permute(2, 0, 1))
    assert cropped.shape == (3, 32, 32) and cropped.dtype == torch.uint8
    reference = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)]
    )(Image.fromarray(cropped.permute(1, 2, 0).numpy()))
    ours = Normalize(preprocessing.mean, preprocessing.std)(cropped[None])
    assert torch.equal(ours[0], reference)


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    from densenet.data.datasets import download

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match="could not download cifar10 into"):
        download("cifar10", tmp_path)


def test_image_folder_batches_are_the_same_with_or_without_workers(tmp_path):
    from densenet.data.loaders import make_batches

    write_image_folder(tmp_path)
    data = load_split("imagefolder", tmp_path, "train")
    preprocessing = Preprocessing(24, 28, (0.5,) * 3, (0.5,) * 3)

    def epoch(workers, start_step=0):
        batches = make_batches(data, 3, torch.device("cpu"), train=True, workers=workers, seed=1,
                               preprocessing=preprocessing, in_channels=3,
                               augment="random_resized_crop_flip")  # fmt: skip
        return list(batches.epoch(4, start_step))

    serial, parallel, resumed = epoch(0), epoch(2), epoch(2, start_step=1)
    assert len(serial) == 2 and serial[0].images.shape == (3, 3, 24, 24)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(resumed[0].images, serial[1].images)


def test_image_folder_batches_skip_and_count_images_with_too_many_pixels(tmp_path):
    from densenet.data.loaders import make_batches

    write_image_folder(tmp_path, per_class=2)
    Image.new("1", (14000, 13000)).save(tmp_path / "train" / "cat" / "bomb.png")
    Image.new("L", (200000, 1)).save(tmp_path / "train" / "dog" / "strip.png")  # 157 M once resized
    data = load_split("imagefolder", tmp_path, "train")
    preprocessing = Preprocessing(24, 28, (0.5,) * 3, (0.5,) * 3)
    for train in (True, False):
        options = dict(preprocessing=preprocessing, in_channels=3, augment="crop")
        batches = make_batches(data, 6, torch.device("cpu"), train=train, **options)
        (batch,) = batches.epoch(0)
        assert batch.skipped == 2 and batch.images.shape == (4, 3, 24, 24)


def test_channel_stats_match_torch_on_the_whole_tensor():
    from densenet.data.datasets import channel_stats

    images = torch.randint(0, 256, (50, 3, 6, 5), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=7)
    pixels = images.transpose(0, 1).flatten(1).double() / 255
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-6)
    assert std == pytest.approx(pixels.std(1, correction=0).tolist(), abs=1e-6)


def test_training_batches_split_evenly_and_evaluation_batches_nearly_so():
    assert Shard(1, 4).of(64, train=True) == slice(16, 32)
    assert Shard().of(64, train=True) == slice(0, 64)
    with pytest.raises(ConfigError, match="multiple of 3"):
        Shard(0, 3).of(64, train=True)
    # 10 evaluation images over 3 processes: 4, 3 and 3, contiguous.
    assert [Shard(i, 3).of(10, train=False) for i in range(3)] == [
        slice(0, 4),
        slice(4, 7),
        slice(7, 10),
    ]


def test_an_svhn_file_declaring_other_arrays_is_refused_before_loading(tmp_path, monkeypatch):
    from scipy.io import savemat

    write_svhn(tmp_path)
    savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((64, 64, 3, 2), np.uint8), "y": []})
    with pytest.raises(DatasetError, match=r"not an SVHN file: it declares X \(64, 64, 3, 2\)"):
        load_split("svhn", tmp_path, "test")
    # The image count is bounded too (here lowered, to stay small).
    write_svhn(tmp_path)
    monkeypatch.setattr(datasets, "SVHN_MAX_IMAGES", 11)
    with pytest.raises(DatasetError, match="N at most 11"):
        load_split("svhn", tmp_path, "test")
