import pytest
import torch
from torchvision.transforms import v2

from densenet.data.datasets import TensorData, load_split
from densenet.data.erasing import erase_batch
from densenet.data.images import train_transform
from densenet.data.loaders import Shard, TensorBatches, make_batches
from densenet.models.presets import Preprocessing
from fake_data import write_image_folder

POLICIES = ["randaugment", "trivialaugment"]


def copies_of_one_image(n=64):
    """``n`` identical images: whatever tells them apart is augmentation."""
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator())
    return TensorData(image.expand(n, -1, -1, -1).clone(), torch.zeros(n, dtype=torch.long), ["a"])


def batches(data, policy, **options):
    return TensorBatches(data, 16, torch.device("cpu"), train=True, seed=3, augment="none",
                         auto_augment=policy, **options)  # fmt: skip


def distinct(images):
    return len({image.numpy().tobytes() for image in images})


@pytest.mark.parametrize("policy", POLICIES)
def test_in_memory_auto_augment_draws_per_image_and_per_step(policy):
    data = copies_of_one_image()
    plain = list(batches(data, "none").epoch(0))
    assert all(distinct(batch.images) == 1 for batch in plain)
    augmented = list(batches(data, policy).epoch(0))
    # One op for a whole batch would leave its copies identical to each other.
    assert all(distinct(batch.images) >= 8 for batch in augmented)
    assert not torch.equal(augmented[0].images, augmented[1].images)  # new draws every step
    assert augmented[0].images.dtype == torch.uint8 and augmented[0].images.shape == (16, 3, 16, 16)


@pytest.mark.parametrize("policy", POLICIES)
def test_in_memory_auto_augment_depends_only_on_seed_epoch_step_and_place(policy):
    data = copies_of_one_image()
    full = list(batches(data, policy).epoch(1))
    resumed = list(batches(data, policy).epoch(1, start_step=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(full[2:], resumed, strict=True))
    assert not torch.equal(next(batches(data, policy).epoch(2)).images, full[0].images)
    # Two processes each augment their half as the lone process did.
    halves = [next(batches(data, policy, shard=Shard(i, 2)).epoch(1)).images for i in range(2)]
    assert torch.equal(torch.cat(halves), full[0].images)


@pytest.mark.parametrize("policy", POLICIES)
def test_auto_augment_takes_one_channel_8x8_digits(policy):
    data = load_split("digits", "unused", "train")
    batch = next(TensorBatches(data, 32, torch.device("cpu"), train=True, augment="crop",
                               padding=1, auto_augment=policy).epoch(0))  # fmt: skip
    assert batch.images.shape == (32, 1, 8, 8) and batch.images.dtype == torch.uint8


def test_auto_augment_is_only_for_training():
    data = copies_of_one_image()
    test = TensorBatches(data, 16, torch.device("cpu"), train=False, auto_augment="randaugment")
    assert all(distinct(batch.images) == 1 for batch in test.epoch(0))


@pytest.mark.parametrize(
    ("policy", "kind"), [("randaugment", v2.RandAugment), ("trivialaugment", v2.TrivialAugmentWide)]
)
def test_image_file_transform_ends_with_the_policy(policy, kind):
    preprocessing = Preprocessing(24, 28, (0.5,) * 3, (0.5,) * 3)
    for augment in ("none", "crop_flip", "random_resized_crop_flip"):
        plain = train_transform(preprocessing, augment, 4).transforms
        with_policy = train_transform(preprocessing, augment, 4, policy).transforms
        assert not any(isinstance(step, kind) for step in plain)
        assert isinstance(with_policy[-1], kind) and len(with_policy) == len(plain) + 1
        assert with_policy[-1].__dict__ == kind().__dict__  # torchvision's default settings


def test_image_folder_batches_are_augmented_by_the_policy_and_resume_exactly(tmp_path):
    write_image_folder(tmp_path)
    data = load_split("imagefolder", tmp_path, "train")
    preprocessing = Preprocessing(24, 28, (0.5,) * 3, (0.5,) * 3)

    def epoch(policy, start_step=0):
        built = make_batches(data, 4, torch.device("cpu"), train=True, seed=1, augment="crop_flip",
                             padding=2, preprocessing=preprocessing, in_channels=3,
                             auto_augment=policy)  # fmt: skip
        return [batch.images for batch in built.epoch(0, start_step)]

    plain, augmented = epoch("none"), epoch("trivialaugment")
    assert not all(torch.equal(a, b) for a, b in zip(plain, augmented, strict=True))
    assert torch.equal(epoch("trivialaugment", start_step=1)[0], augmented[1])


def test_random_erasing_sets_one_rectangle_of_some_images_to_zero():
    images = torch.rand(2000, 3, 32, 32) + 1  # no pixel is 0
    out = erase_batch(images, 0.3, seed=5)
    zero = out == 0
    assert torch.equal(out[~zero], images[~zero])  # the rest untouched
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel alike
    erased = zero.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.3) < 0.04
    shares = []
    for mask in zero[erased, 0]:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        height, width = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width
        assert mask.sum() == height * width  # one full rectangle
        assert 0.3 / 2 <= height / width <= 3.3 * 2  # the ratio, give or take rounding
        shares.append(height * width / 1024)
    # Areas of 0.02 to 1/3 of the image, give or take rounding each side to whole pixels.
    assert 0.01 <= min(shares) < 0.05 and 0.3 < max(shares) <= 0.36


def test_random_erasing_is_a_function_of_the_seed():
    images = torch.randn(64, 1, 8, 8)
    assert torch.equal(erase_batch(images, 0.5, seed=1), erase_batch(images, 0.5, seed=1))
    assert not torch.equal(erase_batch(images, 0.5, seed=1), erase_batch(images, 0.5, seed=2))
    assert torch.equal(erase_batch(images, 0.0, seed=1), images)
    assert (erase_batch(images, 1.0, seed=1) == 0).flatten(1).any(1).all()
