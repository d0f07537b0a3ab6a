"""Downloading weights once into a local cache, checking each download against a known hash.

A hash is written ``sha256:<hex>`` or ``md5:<hex>``; a sha256 may be a prefix of at least 8 digits,
which is what torchvision publishes in its file names. A file that fails its check never lands in
the cache, so once a download succeeded it is used offline from then on.
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

URL_SCHEMES = ("http", "https", "file")
_HASH = re.compile(r"^(sha256|md5):([0-9a-f]+)$")


def cache_dir() -> Path:
    root = os.environ.get("DENSENET_CACHE") or Path.home() / ".cache" / "densenet"
    return Path(root)


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


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(url: str) -> Path:
    """Where ``url`` lives in the cache: its own folder, so equal file names from two hosts
    (every timm weight on the Hugging Face hub is ``model.safetensors``) never collide."""
    parsed = urllib.parse.urlparse(url)
    key = hashlib.sha256(url.split("#", 1)[0].encode()).hexdigest()[:16]
    name = Path(urllib.parse.unquote(parsed.path)).name or "weights"
    return cache_dir() / "downloads" / key / name


def fetch(url: str, expected_hash: str | None = None, progress: bool = False) -> Path:
    """A local copy of ``url``: downloaded on first use, verified, then reused without network.

    The hash comes from ``expected_hash`` or from a ``#sha256=<hex>`` / ``#md5=<hex>`` fragment
    of the URL (pip's convention).
    """
    address, _, fragment = url.partition("#")
    if expected_hash is None and fragment:
        expected_hash = fragment.replace("=", ":", 1)
    check = check_hash_spec(expected_hash) if expected_hash else None
    target = cached_path(url)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        try:
            torch.hub.download_url_to_file(address, str(partial), progress=progress)
        except (OSError, ValueError) as error:
            raise WeightsError(
                f"could not download {address} ({error}); check the address and network, or "
                "download the file by hand and pass its local path"
            ) from None
        if check is not None:
            algorithm, digest = check
            actual = file_digest(partial, algorithm)
            if not actual.startswith(digest):
                raise WeightsError(
                    f"{address} has {algorithm} {actual}, expected {digest}: the download is "
                    "corrupt or the file was changed; nothing was cached"
                )
        os.replace(partial, target)
    return target
