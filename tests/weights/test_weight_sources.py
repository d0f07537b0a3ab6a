"""Weights from files, URLs (cache + hash check) and the published-weights table; convert CLI."""

import dataclasses
import errno
import hashlib
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from architectures import short_bc
from densenet import WeightsError, create_model, load_model, save_weights
from densenet.cli import main
from densenet.errors import WriteError
from densenet.weights.download import cached_path, fetch, recorded_hash_path
from densenet.weights.io import read_checkpoint
from densenet.weights.pretrained import PUBLISHED


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "source" / "m.safetensors"
    path.parent.mkdir()
    return save_weights(short_bc(), path)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_url_is_downloaded_once_then_used_offline(cache, weights_file):
    url = weights_file.as_uri()
    first = short_bc(weights=url)
    assert cached_path(url).is_file()
    weights_file.unlink()  # the "server" is gone: the cached copy must do
    second = short_bc(weights=url)
    assert torch.equal(first.features.conv0.weight, second.features.conv0.weight)


def test_same_file_name_from_two_urls_does_not_collide(cache, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = save_weights(short_bc(growth_rate=4), tmp_path / "a" / "model.safetensors")
    b = save_weights(short_bc(growth_rate=6), tmp_path / "b" / "model.safetensors")
    assert load_model(fetch(a.as_uri()))[0].config.growth_rate == 4
    assert load_model(fetch(b.as_uri()))[0].config.growth_rate == 6


@pytest.mark.parametrize("digits", [8, 64])
def test_hash_is_checked_on_download(cache, weights_file, digits):
    good = sha256(weights_file)[:digits]
    assert fetch(weights_file.as_uri() + f"#sha256={good}").is_file()


def test_wrong_hash_caches_nothing(cache, weights_file):
    url = weights_file.as_uri()
    with pytest.raises(WeightsError, match="expected 00000000: the download is corrupt"):
        fetch(url, "sha256:00000000")
    assert not cached_path(url).exists()
    md5 = hashlib.md5(weights_file.read_bytes()).hexdigest()
    assert fetch(url, f"md5:{md5}").is_file()  # the right hash still works afterwards


def test_a_pinned_hash_is_checked_even_when_the_url_is_cached(
    cache, weights_file, tmp_path, capsys
):
    url = weights_file.as_uri()
    meta = {"preprocessing": {"input_size": 32, "resize_size": 32, "mean": [0.5] * 3,
                              "std": [0.5] * 3}}  # fmt: skip
    save_weights(short_bc(), weights_file, meta=meta)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    predict = ["predict", str(image), "--weights"]
    assert main([*predict, url]) == 0  # downloaded and cached, with no hash to check
    capsys.readouterr()
    assert main([*predict, url + "#sha256=deadbeef"]) == 2
    error = capsys.readouterr().err
    assert "not the file this hash pins" in error and error.count("\n") == 1
    with pytest.raises(WeightsError, match=r"md5 [0-9a-f]{32}, expected 0{32}"):
        fetch(url, "md5:" + "0" * 32)
    assert fetch(url + f"#sha256={sha256(weights_file)}") == cached_path(url)


def test_a_cached_file_that_changed_is_refused_and_one_without_a_record_replaced(
    cache, weights_file
):
    url = weights_file.as_uri()
    cached = fetch(url)
    content = bytearray(cached.read_bytes())
    content[-1] ^= 1
    cached.write_bytes(bytes(content))
    with pytest.raises(WeightsError, match=r"has changed since it was downloaded.*delete"):
        fetch(url)
    # A file with no record (cut off mid-download, or cached before records) is fetched again.
    recorded_hash_path(cached).unlink()
    assert fetch(url).read_bytes() == weights_file.read_bytes()
    assert recorded_hash_path(cached).read_text().strip() == sha256(weights_file)


@pytest.mark.parametrize("spec", ["sha256:abc", "crc:1234abcd", "md5:1234"])
def test_malformed_hash_is_named(cache, weights_file, spec):
    with pytest.raises(WeightsError, match="hash"):
        fetch(weights_file.as_uri(), spec)


def test_unreachable_url_says_what_to_do(cache, tmp_path):
    with pytest.raises(WeightsError, match=r"could not download .* download the file by hand"):
        read_checkpoint((tmp_path / "missing.pth").as_uri())


def test_published_table_is_complete_and_consistent():
    publishers = {w.publisher for w in PUBLISHED.values()}
    assert publishers == {"torchvision", "timm", "keras"}
    for name, weights in PUBLISHED.items():
        assert name == f"{weights.model}.{weights.tag}"
        assert weights.url.startswith("https://")
        assert 70 < weights.top1 < weights.top5 < 100
        if weights.hash is not None:
            assert re.fullmatch("(sha256:[0-9a-f]{8,64}|md5:[0-9a-f]{32})", weights.hash)
        if weights.publisher == "torchvision":
            # torchvision's file names carry the sha256 prefix that its loader checks.
            assert f"-{weights.hash.split(':')[1]}.pth" in weights.url
    assert PUBLISHED["densenet121.tv_in1k"].top1 == 74.434


def test_named_weights_download_from_the_table(cache, monkeypatch, tmp_path):
    # Stand in for the publisher: a torchvision-format file served from a file:// URL.
    reference = create_model("densenet121")
    path = tmp_path / "densenet121.pth"
    torch.save(reference.state_dict(), path)
    entry = PUBLISHED["densenet121.tv_in1k"]
    fake = dataclasses.replace(entry, url=path.as_uri(), hash=f"sha256:{sha256(path)}")
    monkeypatch.setitem(PUBLISHED, "densenet121.tv_in1k", fake)
    for source in ("tv_in1k", "densenet121.tv_in1k"):
        model = create_model("densenet121", weights=source)
        assert torch.equal(model.classifier.weight, reference.classifier.weight)
    output = tmp_path / "converted.safetensors"
    assert main(["convert", "densenet121.tv_in1k", "--output", str(output)]) == 0
    meta = load_model(output)[1].meta
    assert meta["published"] == "densenet121.tv_in1k" and meta["top1"] == 74.434
    assert meta["preprocessing"]["resize_size"] == 256
    copy = path.with_name("copy.pth")  # not cached yet, so it is downloaded and checked
    copy.write_bytes(path.read_bytes())
    tampered = dataclasses.replace(fake, url=copy.as_uri(), hash="md5:" + "0" * 32)
    monkeypatch.setitem(PUBLISHED, "densenet121.tv_in1k", tampered)
    with pytest.raises(WeightsError, match="md5"):
        create_model("densenet121", weights="tv_in1k")


@pytest.mark.parametrize(
    "name, source, message",
    [
        ("densenet121", "tv_in1kk", "did you mean 'tv_in1k'"),
        ("densenet121", "densenet169.tv_in1k", "are for densenet169, not densenet121"),
        ("densenet161", "nowhere", "not a file, a URL or a published name"),
        ("densenet161", "nowhere.pth", "weights file not found: nowhere.pth"),
    ],
)
def test_unknown_weights_name_is_explained(name, source, message):
    with pytest.raises(WeightsError, match=message):
        create_model(name, weights=source)


def test_backbone_only_file_needs_a_head_decision(tmp_path):
    state_dict = {
        k: v for k, v in short_bc().state_dict().items() if not k.startswith("classifier")
    }
    path = tmp_path / "notop.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsError, match=r"holds no classifier.*num_classes=N"):
        short_bc(weights=path)
    model = short_bc(weights=path, num_classes=7)
    assert model.classifier.out_features == 7
    assert torch.equal(model.features.conv0.weight, state_dict["features.conv0.weight"])


@pytest.mark.parametrize("suffix", [".onnx", ".keras", ".npz"])
def test_other_formats_are_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"PK\x03\x04 something")
    with pytest.raises(WeightsError, match=r"unknown weights format .*torch\.save\(model"):
        read_checkpoint(path)


def test_convert_cli_writes_a_self_describing_file(tmp_path, capsys):
    reference = create_model("densenet_bc100_k12")
    source = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), source)
    output = tmp_path / "out" / "bc100.safetensors"
    args = ["convert", str(source), "--output", str(output), "--model", "densenet_bc100_k12"]
    assert main(args) == 0
    assert "0.77M parameters" in capsys.readouterr().out
    rebuilt, checkpoint = load_model(output)
    assert checkpoint.meta["converted_from"] == str(source)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), reference.eval()(x))


def test_convert_cli_errors(tmp_path, capsys):
    source = tmp_path / "tv.pth"
    torch.save(short_bc().state_dict(), source)
    assert main(["convert", str(source), "--output", str(tmp_path / "o.safetensors")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert main(["convert", str(source), "--output", str(tmp_path / "o.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    args = ["convert", str(source), "--output", str(tmp_path / "o.safetensors")]
    assert main([*args, "--model", "densenet121"]) == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_a_full_cache_disk_is_one_line_and_leaves_nothing(cache, weights_file, monkeypatch):
    def full(url, path, progress=True):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.hub, "download_url_to_file", full)
    with pytest.raises(WriteError, match="No space left on device; free some space"):
        fetch(weights_file.as_uri())
    assert not [p for p in cache.rglob("*") if p.is_file()]
