"""The decode-once cache: the four CIFAR-10 arrays as an uncompressed ``.npz``.

A cache file is named after the source's sha256 and holds, beside the arrays, that checksum,
a format version and a sha256 digest of the arrays themselves (names, dtypes, shapes and
bytes), so a cache that is stale, truncated, garbled or altered in any array is never used: it
is rebuilt from the source. It is written with :func:`blockdpr.runinfo.atomic_write`; the temp
files of writes that were killed (an hour old or more: data-parallel ranks may be writing now)
are removed at the next write.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..runinfo import atomic_write, remove_stale_temps
from .dataset import CLASSES, IMAGE_SHAPE

ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
CACHE_VERSION = 2  # 2: adds the digest of the arrays
STALE_TEMP_SECONDS = 3600  # a cache write takes seconds; a temp file this old was left by a killed one


def cache_dirs(source: Path, cache_dir=None) -> list[Path]:
    """Candidate cache directories, preferred first: ``cache_dir`` alone when given, else
    ``<source dir>/cache`` then ``$BLOCKDPR_CACHE`` (default ``~/.cache/blockdpr``)."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    fallback = os.environ.get("BLOCKDPR_CACHE") or Path.home() / ".cache" / "blockdpr"
    return [source.parent / "cache", Path(fallback).expanduser()]


def cache_name(checksum: str) -> str:
    """File name of the cache of the source with sha256 ``checksum``."""
    return f"cifar10-{checksum[:16]}.npz"


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 hex digest of the arrays of :data:`ARRAY_KEYS`: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()  # the fastest of hashlib on CPUs with SHA extensions
    for key in ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays look like a CIFAR-10 dataset: uint8 images
    ``[N, 32, 32, 3]`` and int64 labels ``[N]`` in 0..9, for both splits."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"{split}_images: {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"{split}_labels: {labels.dtype} {labels.shape}")
        if labels.size == 0 or labels.min() < 0 or labels.max() >= len(CLASSES):
            raise ValueError(f"{split}_labels out of range")


def load_cache(file: Path, checksum: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None if it is absent, stale or corrupt.

    Checks the stored source checksum and format version, the zip CRCs of the npz members,
    the digest of the arrays' contents, and their shapes, dtypes and label range.
    """
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            if str(npz["checksum"]) != checksum or int(npz["version"]) != CACHE_VERSION:
                return None
            arrays = {k: npz[k] for k in ARRAY_KEYS}
            stored_digest = str(npz["digest"])
        check_arrays(arrays)
    except Exception:  # truncated / garbled / missing fields / wrong shapes: rebuild
        return None
    return arrays if arrays_digest(arrays) == stored_digest else None


def save_cache(file: Path, arrays: dict[str, np.ndarray], checksum: str) -> None:
    """Write the cache of the source with sha256 ``checksum`` atomically (creating its directory)."""
    fields = dict(checksum=np.array(checksum), version=np.array(CACHE_VERSION),
                  digest=np.array(arrays_digest(arrays)))
    remove_stale_temps(file.parent, older_than=STALE_TEMP_SECONDS)
    atomic_write(file, lambda f: np.savez(f, **fields, **{k: arrays[k] for k in ARRAY_KEYS}))
