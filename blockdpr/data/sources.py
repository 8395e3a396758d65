"""Finding the CIFAR-10 source a user means, fingerprinting it, and reading it.

A source is the bundled JPEG zip (or another with its layout, :mod:`.jpeg_zip`), a
``cifar-10-batches-py`` directory or the ``cifar-10-python.tar.gz`` archive (:mod:`.batches`),
or a directory holding one of those.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from .batches import batch_files, read_batch_dir, read_batch_tar
from .dataset import (
    BATCH_DIR_NAME, BUNDLED_NAME, CIFAR10_TAR_NAME, HOW_TO_GET, REPO_ROOT, TEST_BATCH, TRAIN_BATCHES, DataError,
)
from .jpeg_zip import decode_zip


def default_data_path() -> Path:
    """The bundled zip: ``data/cifar10-jpeg-q75.zip`` in the repository (``--data``'s default)."""
    return REPO_ROOT / "data" / BUNDLED_NAME


def resolve_source(path: str | os.PathLike | None) -> tuple[str, Path]:
    """Map a user path to ``(kind, resolved path)``; kind is "zip", "tar" or "batches"."""
    p = default_data_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise DataError(f"CIFAR-10 not found: {p} does not exist.\n{HOW_TO_GET}")
    p = p.resolve()

    if p.is_dir():
        if p.name == BATCH_DIR_NAME or any(
            (p / f).exists() for f in (*TRAIN_BATCHES, TEST_BATCH)
        ):
            return "batches", p
        inside = (
            (BUNDLED_NAME, "zip"),
            (BATCH_DIR_NAME, "batches"),
            (CIFAR10_TAR_NAME, "tar"),
        )
        for name, kind in inside:
            if (p / name).exists():
                return kind, (p / name).resolve()
        looked = ", ".join(name for name, _ in inside)
        raise DataError(
            f"CIFAR-10 not found in directory {p}: looked for {looked} and for "
            f"{TRAIN_BATCHES[0]} etc. directly in it. {HOW_TO_GET}"
        )
    if p.name.endswith(".zip"):
        return "zip", p
    if p.name.endswith((".tar.gz", ".tgz")):
        return "tar", p
    if zipfile.is_zipfile(p):
        return "zip", p
    if tarfile.is_tarfile(p):
        return "tar", p
    raise DataError(f"{p} is neither a zip, a .tar.gz nor a directory. {HOW_TO_GET}")


def hash_file(path: Path, algorithm: str = "sha256", h=None) -> str:
    """Hex digest of a file, read in 1 MiB chunks (``h`` continues an existing hash)."""
    h = h or hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_checksum(kind: str, path: Path) -> str:
    """sha256 of the source file; for a batch directory, over the six batch files in order."""
    if kind != "batches":
        return hash_file(path)
    h = hashlib.sha256()
    for f in batch_files(path):
        hash_file(f, h=h)
    return h.hexdigest()


def decode_source(kind: str, path: Path, progress: bool) -> dict[str, np.ndarray]:
    """Read a source into ``{"train_images", "train_labels", "test_images", "test_labels"}``:
    uint8 ``[N, 32, 32, 3]`` (HWC, RGB) and int64 ``[N]`` (the slow path the cache avoids)."""
    if kind == "zip":
        try:
            return decode_zip(path, progress)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a valid zip ({e}); it may be corrupt. {HOW_TO_GET}") from None
    if kind == "tar":
        return read_batch_tar(path)
    return read_batch_dir(path)
