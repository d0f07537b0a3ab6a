import csv

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from architectures import short_bc
from densenet import (
    DenseNetError,
    Preprocessing,
    create_model,
    get_spec,
    load_for_inference,
    save_weights,
)
from densenet.cli import main
from densenet.data.datasets import load_split
from densenet.data.images import eval_transform, read_image
from densenet.data.loaders import Normalize, make_batches
from densenet.deploy.predict import Predictor, load_image
from densenet.errors import DatasetError
from fake_data import write_image_folder

PREPROCESSING = Preprocessing(
    input_size=32, resize_size=36, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
)


def write_image(path, size=(50, 40), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    Image.fromarray(pixels, mode=None).convert(mode).save(path)
    return path


def test_preprocessing_is_resize_crop_normalise(tmp_path):
    path = write_image(tmp_path / "a.png", size=(72, 48))
    x = load_image(path, PREPROCESSING, in_channels=3)
    assert x.shape == (3, 32, 32)
    # Reference: PIL bilinear resize of the short side to 36 (54x36), centre crop, then normalise.
    image = Image.open(path).convert("RGB").resize((54, 36), Image.BILINEAR)
    left, top = (54 - 32) // 2, (36 - 32) // 2
    ref = torch.from_numpy(np.array(image)[top : top + 32, left : left + 32]).permute(2, 0, 1)
    ref = (ref.float() / 255 - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor(
        [0.2, 0.25, 0.3]
    )[:, None, None]
    # torchvision's antialiased resize reproduces PIL's up to rounding: at most one uint8 step
    # (its vectorised and scalar kernels round differently; the scalar ones reach one step), plus
    # float32 rounding of normalised values of magnitude ~3 (a few 1e-7).
    one_step = 1 / 255 / 0.2
    assert (x - ref).abs().max() <= one_step + 1e-5


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_evaluation_and_prediction_make_the_same_input_from_a_file(
    tmp_path, in_channels, interpolation
):
    write_image_folder(tmp_path, per_class=2, size=45)
    data = load_split("imagefolder", tmp_path, "val")
    mean, std = PREPROCESSING.mean[:in_channels], PREPROCESSING.std[:in_channels]
    preprocessing = Preprocessing(32, 36, mean, std, interpolation)
    batches = make_batches(data, 4, torch.device("cpu"), train=False,
                           preprocessing=preprocessing, in_channels=in_channels)  # fmt: skip
    evaluated = Normalize(mean, std)(next(batches.epoch(0)).images)
    predicted = torch.stack(
        [load_image(path, preprocessing, in_channels) for path, _ in data.samples]
    )
    assert evaluated.shape == (4, in_channels, 32, 32)
    assert torch.equal(evaluated, predicted)


def test_grayscale_models_get_one_channel(tmp_path):
    path = write_image(tmp_path / "g.jpg", mode="RGB")
    gray = Preprocessing(8, 8, (0.5,), (0.5,))
    assert load_image(path, gray, in_channels=1).shape == (1, 8, 8)


def test_predictions_match_the_model_and_use_class_names(tmp_path):
    model = short_bc(num_classes=4).eval()
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    predictor = Predictor(model, PREPROCESSING, ["cat", "dog", "fox", "owl"])
    predictions = predictor.predict(paths, top_k=2, batch_size=2)
    batch = torch.stack([load_image(p, PREPROCESSING, 3) for p in paths])
    with torch.no_grad():
        expected = model(batch).softmax(1)
    for prediction, row in zip(predictions, expected, strict=True):
        best = int(row.argmax())
        assert prediction.top[0] == (
            ["cat", "dog", "fox", "owl"][best],
            pytest.approx(float(row[best])),
        )
        assert len(prediction.top) == 2 and prediction.top[0][1] >= prediction.top[1][1]


def test_cli_reads_preprocessing_and_classes_from_the_weights_file(tmp_path, capsys):
    model = short_bc(num_classes=3)
    weights = save_weights(
        model,
        tmp_path / "m.safetensors",
        meta={"preprocessing": PREPROCESSING.to_dict(), "class_names": ["a", "b", "c"]},
    )
    image = write_image(tmp_path / "x.png", size=(300, 200))
    assert main(["predict", str(image), "--weights", str(weights), "--top-k", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ")
    probabilities = [float(part.split()[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert sorted(part.split()[0] for part in line.split(": ", 1)[1].split(", ")) == ["a", "b", "c"]
    assert sum(probabilities) == pytest.approx(1.0, abs=2e-3)


def test_cli_with_a_torchvision_checkpoint_uses_the_preset(tmp_path, capsys):
    torch.save(torchvision.models.densenet121(num_classes=5).state_dict(), tmp_path / "tv.pth")
    image = write_image(tmp_path / "x.jpg", size=(256, 300))
    argv = ["predict", str(image), "--weights", str(tmp_path / "tv.pth")]
    assert main(argv) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*argv, "--model", "densenet121", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.count(":") == 1


def test_unreadable_image_is_named(tmp_path, capsys):
    model = short_bc(num_classes=3)
    weights = save_weights(
        model, tmp_path / "m.safetensors", meta={"preprocessing": PREPROCESSING.to_dict()}
    )
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    assert main(["predict", str(good), str(bad), "--weights", str(weights)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing is reported until every file has been read
    assert "cannot read image" in captured.err and "bad.png" in captured.err
    with pytest.raises(DenseNetError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png", PREPROCESSING, 3)


@pytest.fixture
def tiny_weights(tmp_path):
    model = short_bc(num_classes=3)
    return save_weights(
        model, tmp_path / "m.safetensors", meta={"preprocessing": PREPROCESSING.to_dict()}
    )


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, tiny_weights, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 13000)).save(bomb)  # 22 KB on disk, 182 M pixels decoded
    assert bomb.stat().st_size < 30_000
    assert main(["predict", str(bomb), "--weights", str(tiny_weights)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"densenet predict: error: cannot read image {bomb}: ")
    assert error.count("\n") == 1


def test_images_past_the_pixel_limit_before_or_after_the_resize_are_refused(tmp_path):
    large = tmp_path / "large.png"
    Image.new("L", (9000, 8000)).save(large)  # under Pillow's own limit, over ours
    with pytest.raises(DenseNetError, match=r"large\.png: it is 9000x8000, more than the 67108864"):
        load_image(large, PREPROCESSING, 3)
    strip = tmp_path / "strip.png"
    Image.new("L", (65536, 1)).save(strip)  # 142 bytes; resized to a short side of 36, 85 M pixels
    with pytest.raises(DenseNetError, match=r"strip\.png: resizing its short side to 36 px"):
        load_image(strip, PREPROCESSING, 3)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = torch.from_numpy(((values.astype(np.int64) + 128) // 257).astype(np.uint8))
    assert torch.equal(read_image(tmp_path / "deep.png", 1)[0], expected)
    assert torch.equal(read_image(tmp_path / "deep.png", 3), expected.expand(3, 40, 50))


def test_floating_point_images_are_refused_not_clipped(tmp_path):
    # Values in 0-1 (or Hounsfield units) would all land on one or two 8-bit levels.
    values = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    assert Image.open(tmp_path / "float.tiff").mode == "F"
    with pytest.raises(DatasetError, match=r"float\.tiff: it holds 32-bit floating-point pixels"):
        read_image(tmp_path / "float.tiff", 1)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_in_training_evaluation_and_predict(tmp_path, suffix):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    folder = tmp_path / "val" / "cat"
    folder.mkdir(parents=True)
    path = folder / f"x{suffix}"
    Image.fromarray(rgb).save(path, exif=exif, quality=100)
    upright = read_image(path, 3)
    assert upright.shape == (3, 60, 30)
    if suffix == ".png":  # lossless: the pixels themselves can be compared
        assert torch.equal(upright, torch.from_numpy(np.rot90(rgb, k=-1).copy()).permute(2, 0, 1))
    preprocessing = Preprocessing(24, 24, (0.5,) * 3, (0.5,) * 3)
    batches = make_batches(load_split("imagefolder", tmp_path, "val"), 1, torch.device("cpu"),
                           train=True, preprocessing=preprocessing, in_channels=3,
                           augment="none")  # fmt: skip
    (batch,) = batches.epoch(0)
    assert torch.equal(batch.images[0], eval_transform(preprocessing)(upright))
    predicted = load_image(path, preprocessing, 3)
    assert torch.equal(predicted, Normalize((0.5,) * 3, (0.5,) * 3)(batch.images)[0])


def test_stored_preprocessing_wins_over_the_named_preset(tmp_path):
    # The file records what its weights were trained with; the preset only fills in for files
    # that record nothing (a torchvision checkpoint).
    name = "densenet_bc100_k12"
    weights = save_weights(
        create_model(name),
        tmp_path / "m.safetensors",
        meta={"preprocessing": PREPROCESSING.to_dict()},
    )
    assert get_spec(name).preprocessing != PREPROCESSING
    assert load_for_inference(weights, name).preprocessing == PREPROCESSING
    assert load_for_inference(weights).preprocessing == PREPROCESSING


def test_a_folder_is_classified_recursively_into_a_csv(tmp_path, tiny_weights, capsys):
    folder = tmp_path / "photos"
    images = [write_image(folder / "a.png"), write_image(folder / "deep" / "b.jpg", seed=1)]
    (folder / "notes.txt").write_text("not an image")
    (folder / "deep" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    output = tmp_path / "preds.csv"
    argv = ["predict", str(folder), "--weights", str(tiny_weights), "--top-k", "2"]
    assert main([*argv, "--batch-size", "2", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [str(p) for p in images]
    assert f"skipped {folder / 'deep' / 'broken.png'}: unreadable" in captured.err
    rows = list(csv.reader(output.open()))
    assert rows[0] == ["path", "label_1", "probability_1", "label_2", "probability_2"]
    assert [row[0] for row in rows[1:]] == [str(p) for p in images]


def test_a_folder_without_images_is_one_line(tmp_path, tiny_weights, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--weights", str(tiny_weights)]) == 2
    assert "holds no image files" in capsys.readouterr().err
