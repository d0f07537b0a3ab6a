"""Downloading weights once into a local cache, checking each download against a known hash.

A hash is written ``sha256:<hex>`` or ``md5:<hex>``; a sha256 may be a prefix of at least 8 digits,
which is what torchvision publishes in its file names. A file that fails its check never lands in
the cache, so once a download succeeded it is used offline from then on.

The cache is keyed by the URL without its hash, so a cached file is checked again on every use:
against the sha256 recorded when it was downloaded (a file changed on disk is refused) and against
the hash this use pins, if any (a cached file never stands in for one with another hash).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

import torch

from densenet.errors import WeightsError
from densenet.files import SPACE_ERRORS, atomic_write, cache_dir, write_error

URL_SCHEMES = ("http", "https", "file")
_HASH = re.compile(r"^(sha256|md5):([0-9a-f]+)$")


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in URL_SCHEMES


def check_hash_spec(spec: str) -> tuple[str, str]:
    """Split ``sha256:<hex>`` / ``md5:<hex>`` into (algorithm, digest); ``WeightsError`` if bad."""
    match = _HASH.match(spec.strip().lower())
    if not match:
        raise WeightsError(f"hash {spec!r} is not of the form sha256:<hex> or md5:<hex>")
    algorithm, digest = match.groups()
    full = hashlib.new(algorithm).digest_size * 2
    if algorithm == "md5" and len(digest) != full:
        raise WeightsError(f"md5 hash {spec!r} must have {full} hex digits")
    if algorithm == "sha256" and not 8 <= len(digest) <= full:
        raise WeightsError(f"sha256 hash {spec!r} must have between 8 and {full} hex digits")
    return algorithm, digest


def file_digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    """The hex digests of ``path`` under each of ``algorithms``, in one pass over the file."""
    digests = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(chunk)
    return {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}


def cached_path(url: str) -> Path:
    """Where ``url`` lives in the cache: its own folder, so equal file names from two hosts
    (every timm weight on the Hugging Face hub is ``model.safetensors``) never collide."""
    parsed = urllib.parse.urlparse(url)
    key = hashlib.sha256(url.split("#", 1)[0].encode()).hexdigest()[:16]
    name = Path(urllib.parse.unquote(parsed.path)).name or "weights"
    return cache_dir() / "downloads" / key / name


def recorded_hash_path(target: Path) -> Path:
    """Where the sha256 of the cached file ``target`` was written when it was downloaded."""
    return target.with_name(target.name + ".sha256")


def fetch(url: str, expected_hash: str | None = None, progress: bool = False) -> Path:
    """A local copy of ``url``: downloaded on first use, verified, then reused without network.

    The hash comes from ``expected_hash`` or from a ``#sha256=<hex>`` / ``#md5=<hex>`` fragment
    of the URL (pip's convention). It is checked on every call, cached file or not.
    """
    address, _, fragment = url.partition("#")
    if expected_hash is None and fragment:
        expected_hash = fragment.replace("=", ":", 1)
    check = check_hash_spec(expected_hash) if expected_hash else None
    target = cached_path(url)
    record = recorded_hash_path(target)
    # A file without its record predates records or was cut off before one was written: it can't
    # be trusted, so it is downloaded again.
    if target.is_file() and record.is_file():
        _check_cached(address, target, record, check)
    else:
        _download(address, target, record, check, progress)
    return target


def _digests(path: Path, check: tuple[str, str] | None) -> dict[str, str]:
    return file_digests(path, {"sha256"} | ({check[0]} if check else set()))


def _pin_mismatch(actual: dict[str, str], check: tuple[str, str] | None) -> str | None:
    """What differs from the pinned hash ("sha256 <actual>, expected <pin>"), or None."""
    if check is None or actual[check[0]].startswith(check[1]):
        return None
    return f"{check[0]} {actual[check[0]]}, expected {check[1]}"


def _check_cached(address: str, target: Path, record: Path, check: tuple[str, str] | None) -> None:
    actual = _digests(target, check)
    recorded = record.read_text(errors="replace").strip()
    if actual["sha256"] != recorded:
        raise WeightsError(
            f"the cached copy of {address} ({target}) has changed since it was downloaded "
            f"(sha256 {actual['sha256']}, recorded {recorded}); delete {target.parent} to "
            "download it again"
        )
    if mismatch := _pin_mismatch(actual, check):
        raise WeightsError(
            f"the cached copy of {address} ({target}) has {mismatch}: it is not the file this "
            f"hash pins; check the hash, or delete {target.parent} to download the URL again"
        )


def _download(
    address: str, target: Path, record: Path, check: tuple[str, str] | None, progress: bool
) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(target, error) from None
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        try:
            torch.hub.download_url_to_file(address, str(partial), progress=progress)
        except OSError as error:
            if error.errno in SPACE_ERRORS:  # the cache's disk, not the network
                raise write_error(target, error) from None
            raise WeightsError(
                f"could not download {address} ({error}); check the address and network, or "
                "download the file by hand and pass its local path"
            ) from None
        except ValueError as error:
            raise WeightsError(
                f"could not download {address} ({error}); check the address and network, or "
                "download the file by hand and pass its local path"
            ) from None
        actual = _digests(partial, check)
        if mismatch := _pin_mismatch(actual, check):
            raise WeightsError(
                f"{address} has {mismatch}: the download is corrupt or the file was changed; "
                "nothing was cached"
            )
        # The record is written last (and an old one removed first): a crash in between leaves a
        # file without a record, which the next call downloads again, never a file with the
        # record of another.
        record.unlink(missing_ok=True)
        os.replace(partial, target)
        atomic_write(record, lambda tmp: tmp.write_text(actual["sha256"] + "\n"))
