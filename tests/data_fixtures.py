"""Builders of tiny synthetic CIFAR-10 sources for the data tests (zips, python batches, tar.gz)."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blockdpr import data
from blockdpr.data import CLASSES, load_cifar10

PER_CLASS = {"train": 3, "test": 2}


def image(label: int, index: int) -> np.ndarray:
    """A smooth 32x32 RGB image that survives JPEG well and encodes its class."""
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 4 + label * 10, y * 4 + index * 5, np.full_like(x, 25 * label)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=kw.pop("format", "JPEG"), quality=95, **kw)
    return buf.getvalue()


def zip_entries(per_class=PER_CLASS, classes=CLASSES) -> dict[str, bytes]:
    entries = {}
    for split, n in per_class.items():
        for label, cls in enumerate(classes):
            for i in range(n):
                entries[f"{split}/{cls}/{i:04d}.jpg"] = jpeg(image(label, i))
    return entries


def write_zip(path: Path, entries: dict[str, bytes], dirs=()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, payload in entries.items():
            zf.writestr(zipfile.ZipInfo(name), payload)
    return path


@pytest.fixture
def tiny_zip(tmp_path) -> Path:
    return write_zip(tmp_path / "tiny.zip", zip_entries())


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python-2 ``str`` (BINSTRING), like the official batches."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def batch(n: int, seed: int, labels=None, data_shape=None) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch pickle with n images (labels cycle through all classes) and its HWC images."""
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    planar = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)
    if data_shape is not None:
        planar = rng.integers(0, 256, data_shape, dtype=np.uint8)
    labels = [i % 10 for i in range(n)] if labels is None else labels
    raw = py2_pickle({b"batch_label": b"fixture", b"labels": labels, b"data": planar})
    return raw, hwc, np.array(labels, dtype=np.int64)


def write_batches(root: Path, n: int = 20) -> tuple[Path, dict[str, np.ndarray]]:
    d = root / data.BATCH_DIR_NAME
    d.mkdir(parents=True)
    train_imgs, train_lbls = [], []
    for k, name in enumerate(data.TRAIN_BATCHES):
        raw, hwc, lbl = batch(n, seed=k)
        (d / name).write_bytes(raw)
        train_imgs.append(hwc)
        train_lbls.append(lbl)
    raw, test_hwc, test_lbl = batch(n, seed=99)
    (d / data.TEST_BATCH).write_bytes(raw)
    (d / data.META_FILE).write_bytes(py2_pickle({b"label_names": [c.encode() for c in CLASSES]}))
    expected = {
        "train_images": np.concatenate(train_imgs),
        "train_labels": np.concatenate(train_lbls),
        "test_images": test_hwc,
        "test_labels": test_lbl,
    }
    return d, expected


def tar_dir(batch_dir: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(batch_dir, arcname=data.BATCH_DIR_NAME)
    return dest


def load(path, tmp_path, **kw):
    return load_cifar10(path, cache_dir=tmp_path / "cache", progress=False, **kw)
