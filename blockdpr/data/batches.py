"""Reading the official CIFAR-10 python batches: a ``cifar-10-batches-py`` directory or the
``cifar-10-python.tar.gz`` archive (read in memory, never extracted).

Each batch file is a pickle (loaded by :mod:`.unpickle`) of at most :data:`MAX_BATCH_BYTES`
(an official batch holds 10,000 x 3,072 bytes of pixels); a larger file or archive member is
refused before it is read, so a hostile archive cannot exhaust memory.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from .dataset import BATCH_DIR_NAME, CLASSES, HOW_TO_GET, META_FILE, TEST_BATCH, TRAIN_BATCHES, DataError
from .unpickle import unpickle

MAX_BATCH_BYTES = 64 << 20  # an official batch: 10,000 images x 3,072 bytes, plus labels


def _check_size(where: str, size: int) -> None:
    """Refuse a batch file of ``size`` bytes before reading it."""
    if size > MAX_BATCH_BYTES:
        raise DataError(
            f"{where} is {size:,} bytes, larger than the {MAX_BATCH_BYTES:,}-byte limit for a "
            f"CIFAR-10 batch file (an official one holds 10,000 images of 3,072 bytes); refusing to read it. {HOW_TO_GET}"
        )


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Batch pickle -> (uint8 ``[n, 32, 32, 3]``, int64 ``[n]``).

    ``data`` is uint8 ``[n, 3072]`` channel-planar (1024 R, 1024 G, 1024 B, each
    row-major 32x32); ``labels`` a list of n ints in 0..9.
    """
    d = unpickle(raw, where)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be a uint8 array [n, 3072], got {desc}.")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'labels' must be a list of ints.") from None
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{where}: {labels.shape} labels for {data.shape[0]} images; expected one label per image."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(
            f"{where}: labels must be in 0..9, found {labels.min()}..{labels.max()}."
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _check_meta(raw: bytes, where: str) -> None:
    """Refuse a ``batches.meta`` whose ``label_names`` are not :data:`CLASSES` in order."""
    names = unpickle(raw, where).get("label_names")
    if names is not None:
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        if names != CLASSES:
            raise DataError(f"{where}: label_names {names} are not the 10 CIFAR-10 classes.")


def _assemble_batches(raws: dict[str, bytes], where: str) -> dict[str, np.ndarray]:
    """Combine raw batch files ``{file name: bytes}`` into the four arrays (uint8 images, int64 labels)."""
    if META_FILE in raws:
        _check_meta(raws[META_FILE], f"{where}/{META_FILE}")
    parts = [_parse_batch(raws[f], f"{where}/{f}") for f in TRAIN_BATCHES]
    test_images, test_labels = _parse_batch(raws[TEST_BATCH], f"{where}/{TEST_BATCH}")
    out = {
        "train_images": np.concatenate([p[0] for p in parts]),
        "train_labels": np.concatenate([p[1] for p in parts]),
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for split in ("train", "test"):
        n = len(np.unique(out[f"{split}_labels"]))
        if n != len(CLASSES):
            raise DataError(f"{where}: the {split} batches contain {n} classes, expected 10.")
    return out


def batch_files(path: Path) -> list[Path]:
    """The six batch files of a ``cifar-10-batches-py`` directory, in order (5 train, then test);
    raises :class:`DataError` naming the missing ones."""
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH) if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"{path} is not a complete {BATCH_DIR_NAME} directory: missing "
            f"{', '.join(missing)}. {HOW_TO_GET}"
        )
    return [path / f for f in (*TRAIN_BATCHES, TEST_BATCH)]


def read_batch_dir(path: Path) -> dict[str, np.ndarray]:
    """The four arrays (see :func:`read_batch_tar`) from a ``cifar-10-batches-py`` directory."""
    files = batch_files(path) + [path / META_FILE] * (path / META_FILE).is_file()
    for f in files:
        _check_size(str(f), f.stat().st_size)
    return _assemble_batches({f.name: f.read_bytes() for f in files}, str(path))


def read_batch_tar(path: Path) -> dict[str, np.ndarray]:
    """Read the batch members of the official .tar.gz in memory (nothing is extracted).

    Returns ``{"train_images", "train_labels", "test_images", "test_labels"}``: uint8
    ``[N, 32, 32, 3]`` (HWC) and int64 ``[N]``. A member over :data:`MAX_BATCH_BYTES` is
    refused from its header, before any of it is decompressed into memory.
    """
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META_FILE}
    raws: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                base = PurePosixPath(member.name).name
                if base not in wanted:
                    continue
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name!r} is not a regular file.")
                if base in raws:
                    raise DataError(f"{path}: {base} appears twice in the archive.")
                _check_size(f"{path}: member {member.name!r}", member.size)
                raws[base] = tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); it may be corrupt. {HOW_TO_GET}") from None
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH) if f not in raws]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}. {HOW_TO_GET}")
    return _assemble_batches(raws, str(path))
