"""Downloading the official ``cifar-10-python.tar.gz`` (for users who are online), md5-checked."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path
from typing import Iterator

from ..runinfo import atomic_write
from .dataset import BUNDLED_NAME, CIFAR10_TAR_MD5, CIFAR10_TAR_NAME, CIFAR10_URL, DataError
from .progress import progress_bar
from .sources import hash_file


def fetch(url: str, progress: bool = True) -> Iterator[bytes]:
    """Stream ``url`` in chunks of up to 1 MiB, with a progress bar when ``progress``."""
    with urllib.request.urlopen(url, timeout=60) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        bar = progress_bar(f"Downloading {url.rsplit('/', 1)[-1]}", total, progress)
        if bar is not None:
            bar.start()
        try:
            while chunk := r.read(1 << 20):
                yield chunk
                if bar is not None:
                    bar.advance(0, len(chunk))
        finally:
            if bar is not None:
                bar.stop()


def download_cifar10(dest_dir, *, progress: bool = True) -> Path:
    """Download the official ``cifar-10-python.tar.gz`` into ``dest_dir`` and verify its md5.

    Returns the path of the verified archive; an existing file with the right md5 is reused.
    The archive appears under its name only once verified (:func:`blockdpr.runinfo.atomic_write`);
    raises :class:`DataError` if the download fails or the md5 differs, keeping nothing.
    """
    dest = Path(dest_dir).expanduser() / CIFAR10_TAR_NAME
    if dest.is_file() and hash_file(dest, "md5") == CIFAR10_TAR_MD5:
        return dest

    def write(f) -> None:
        md5 = hashlib.md5()
        try:
            for chunk in fetch(CIFAR10_URL, progress):
                f.write(chunk)
                md5.update(chunk)
        except OSError as e:  # includes urllib.error.URLError
            raise DataError(
                f"downloading {CIFAR10_URL} failed ({e}). Without internet, use the "
                f"bundled data/{BUNDLED_NAME} (the default) or --data PATH."
            ) from None
        if md5.hexdigest() != CIFAR10_TAR_MD5:
            raise DataError(
                f"downloaded {CIFAR10_URL} has md5 {md5.hexdigest()}, expected {CIFAR10_TAR_MD5}; "
                f"the download is corrupt, try again (nothing was kept)."
            )

    return atomic_write(dest, write)
