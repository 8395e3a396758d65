"""Reading a CIFAR-10 JPEG zip (the bundled ``data/cifar10-jpeg-q75.zip`` layout).

Every entry must be ``(train|test)/<class>/<digits>.jpg`` holding a 32x32 RGB JPEG of at most
1 MiB; names that escape the archive root are refused. Images are decoded by a process pool
(in-process for small archives) into uint8 ``[N, 32, 32, 3]``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from .dataset import CLASSES, HOW_TO_GET, IMAGE_SHAPE, DataError
from .progress import progress_bar

_MAX_JPEG_BYTES = 1 << 20  # a 32x32 JPEG is ~1 kB; anything huge is not CIFAR
_POOL_MIN_IMAGES = 4096  # below this, decoding in-process beats starting workers

_ZIP_ENTRY = re.compile(r"(train|test)/([^/]+)/([^/]+)")
_ZIP_IMAGE = re.compile(r"[0-9]+\.jpg")


def _escapes(name: str) -> bool:
    """True if a zip entry name is absolute or climbs out of the archive root."""
    parts = name.replace("\\", "/").split("/")
    return (
        name.startswith(("/", "\\"))
        or re.match(r"[A-Za-z]:", name) is not None
        or ".." in parts
        or "\x00" in name
    )


def _zip_entries(zf: zipfile.ZipFile, path: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Validate entry names; return ``{split: (entry names, int64 labels)}``.

    Each split must hold the 10 class folders with at least one image each;
    images are ordered by (number, class) so that any prefix is class-balanced.
    """
    found: dict[str, dict[tuple[int, int], str]] = {"train": {}, "test": {}}
    for info in zf.infolist():
        name = info.filename
        if _escapes(name):
            raise DataError(
                f"{path}: zip entry {name!r} escapes the dataset directory (absolute "
                f"path or '..'); refusing to read this archive. {HOW_TO_GET}"
            )
        if info.is_dir():
            continue
        m = _ZIP_ENTRY.fullmatch(name)
        if m is None or _ZIP_IMAGE.fullmatch(m[3]) is None:
            raise DataError(
                f"{path}: unexpected zip entry {name!r}; every file must be "
                f"(train|test)/<class>/<digits>.jpg. {HOW_TO_GET}"
            )
        split, cls, fname = m[1], m[2], m[3]
        if cls not in CLASSES:
            raise DataError(
                f"{path}: zip entry {name!r} has unknown class {cls!r}; expected one "
                f"of {', '.join(CLASSES)}."
            )
        if info.file_size > _MAX_JPEG_BYTES:
            raise DataError(
                f"{path}: zip entry {name!r} is {info.file_size} bytes, too large for "
                f"a 32x32 JPEG."
            )
        key = (int(fname[:-4]), CLASSES.index(cls))
        if key in found[split]:
            raise DataError(
                f"{path}: zip entries {found[split][key]!r} and {name!r} have the same number."
            )
        found[split][key] = name

    result = {}
    for split, entries in found.items():
        classes = {label for _, label in entries}
        if len(classes) != len(CLASSES):
            missing = [CLASSES[i] for i in range(len(CLASSES)) if i not in classes]
            raise DataError(
                f"{path}: found {len(classes)} classes under {split}/, expected the 10 "
                f"CIFAR-10 classes (missing: {', '.join(missing)}). {HOW_TO_GET}"
            )
        keys = sorted(entries)
        labels = np.array([label for _, label in keys], dtype=np.int64)
        result[split] = ([entries[k] for k in keys], labels)
    return result


def _decode_jpegs(zf: zipfile.ZipFile, names: list[str]) -> np.ndarray:
    """Decode zip entries to uint8 ``[len(names), 32, 32, 3]``; each must be a 32x32 RGB JPEG."""
    from PIL import Image

    out = np.empty((len(names), *IMAGE_SHAPE), dtype=np.uint8)
    for i, name in enumerate(names):
        try:
            with Image.open(io.BytesIO(zf.read(name))) as im:
                if im.format != "JPEG" or im.size != (32, 32) or im.mode != "RGB":
                    raise DataError(
                        f"{zf.filename}: {name} is a {im.format} image of size "
                        f"{im.size[0]}x{im.size[1]} mode {im.mode}; expected a 32x32 RGB JPEG."
                    )
                out[i] = np.asarray(im)
        except DataError:
            raise
        except Exception as e:  # PIL raises a zoo of exception types
            raise DataError(f"{zf.filename}: cannot decode {name}: {e}") from None
    return out


_worker_zip: zipfile.ZipFile | None = None


def _pool_init(path: str) -> None:
    """In a worker: open the zip once, for every job the worker runs."""
    global _worker_zip
    _worker_zip = zipfile.ZipFile(path)


def _pool_decode(job: tuple[int, list[str]]) -> tuple[int, np.ndarray]:
    """In a worker: ``(start, names)`` -> ``(start, uint8 [len(names), 32, 32, 3])``."""
    start, names = job
    return start, _decode_jpegs(_worker_zip, names)


def _worker_count() -> int:
    """Decoding processes: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def decode_zip(path: Path, progress: bool) -> dict[str, np.ndarray]:
    """Decode a CIFAR-10 JPEG zip into ``{"train_images", "train_labels", "test_images",
    "test_labels"}`` (uint8 ``[N, 32, 32, 3]`` and int64 ``[N]``), using a process pool."""
    with zipfile.ZipFile(path) as zf:
        splits = _zip_entries(zf, path)
        names = splits["train"][0] + splits["test"][0]
        images = np.empty((len(names), *IMAGE_SHAPE), dtype=np.uint8)
        workers = _worker_count()
        step = 1000
        jobs = [(s, names[s : s + step]) for s in range(0, len(names), step)]
        pool = None
        if len(names) >= _POOL_MIN_IMAGES and workers > 1:
            # fork is cheap and the workers touch only zipfile/PIL/numpy; the pool is
            # started before the progress bar's refresh thread exists
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
            pool = ctx.Pool(min(workers, len(jobs)), initializer=_pool_init, initargs=(str(path),))
        bar = progress_bar(f"Decoding {path.name}", len(names), progress)
        try:
            if bar is not None:
                bar.start()
            if pool is not None:
                results = pool.imap_unordered(_pool_decode, jobs)
            else:
                results = ((s, _decode_jpegs(zf, chunk)) for s, chunk in jobs)
            for s, chunk in results:
                images[s : s + len(chunk)] = chunk
                if bar is not None:
                    bar.advance(0, len(chunk))
        finally:
            if bar is not None:
                bar.stop()
            if pool is not None:
                pool.terminate()
                pool.join()
    n_train = len(splits["train"][0])
    return {
        "train_images": images[:n_train],
        "train_labels": splits["train"][1],
        "test_images": images[n_train:],
        "test_labels": splits["test"][1],
    }
