"""Tests of the decode-once CIFAR-10 cache."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from data_fixtures import load, tiny_zip  # noqa: F401 (tiny_zip: fixture)

from blockdpr.data import load_cifar10
from blockdpr.data import cache, sources


def _fail(*a, **k):
    raise AssertionError("decoder called although the cache should have been used")


def test_cache_is_used_on_second_load(tiny_zip, tmp_path, monkeypatch):
    first = load(tiny_zip, tmp_path)
    files = list((tmp_path / "cache").glob("cifar10-*.npz"))
    assert [f.name for f in files] == [f"cifar10-{first.checksum[:16]}.npz"]
    monkeypatch.setattr(sources, "decode_source", _fail)
    second = load(tiny_zip, tmp_path)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert second.checksum == first.checksum and second.source == first.source


def test_default_cache_beside_source(tiny_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDPR_CACHE", str(tmp_path / "fallback"))
    ds = load_cifar10(tiny_zip, progress=False)
    assert (tiny_zip.parent / "cache" / f"cifar10-{ds.checksum[:16]}.npz").is_file()
    assert not (tmp_path / "fallback").exists()
    assert not list((tiny_zip.parent / "cache").glob("*.tmp"))


def test_cache_falls_back_when_beside_source_unwritable(tiny_zip, tmp_path, monkeypatch):
    (tiny_zip.parent / "cache").write_text("a file, so no directory can be made here")
    monkeypatch.setenv("BLOCKDPR_CACHE", str(tmp_path / "fallback"))
    ds = load_cifar10(tiny_zip, progress=False)
    assert (tmp_path / "fallback" / f"cifar10-{ds.checksum[:16]}.npz").is_file()
    monkeypatch.setattr(sources, "decode_source", _fail)
    assert torch.equal(load_cifar10(tiny_zip, progress=False).train_images, ds.train_images)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "stale"])
def test_corrupt_cache_is_rebuilt(tiny_zip, tmp_path, damage):
    first = load(tiny_zip, tmp_path)
    (cache_file,) = (tmp_path / "cache").glob("cifar10-*.npz")
    raw = bytearray(cache_file.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        # flip a byte inside the train_images array payload
        start = raw.find(b"train_images.npy")
        raw[start + 2000] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"junk")
    else:  # a cache recorded for some other source
        arrays = {k: getattr(first, k).numpy() for k in cache.ARRAY_KEYS}
        cache.save_cache(cache_file, arrays, "0" * 64)
        raw = bytearray(cache_file.read_bytes())
    cache_file.write_bytes(bytes(raw))
    second = load(tiny_zip, tmp_path)
    assert torch.equal(first.train_images, second.train_images)
    assert cache.load_cache(cache_file, first.checksum) is not None  # rewritten intact


@pytest.mark.parametrize("alter", ["zero", "one-pixel"])
def test_cache_with_altered_arrays_is_rebuilt(tiny_zip, tmp_path, alter):
    """Every other field of the cache is kept (its checksum is right); only array contents change."""
    first = load(tiny_zip, tmp_path)
    (cache_file,) = (tmp_path / "cache").glob("cifar10-*.npz")
    with np.load(cache_file) as npz:
        fields = {k: npz[k] for k in npz.files}
    if alter == "zero":
        fields["train_images"] = np.zeros_like(fields["train_images"])
    else:
        fields["test_images"][3, 4, 5, 1] ^= 1
    with open(cache_file, "wb") as f:
        np.savez(f, **fields)
    second = load(tiny_zip, tmp_path)
    assert torch.equal(second.train_images, first.train_images)
    assert torch.equal(second.test_images, first.test_images)
    with np.load(cache_file) as npz:  # rewritten from the source
        assert np.array_equal(npz["train_images"], first.train_images.numpy())
        assert np.array_equal(npz["test_images"], first.test_images.numpy())


def test_wrong_shape_cache_is_rejected(tmp_path):
    good = {
        "train_images": np.zeros((10, 32, 32, 3), np.uint8),
        "train_labels": np.arange(10, dtype=np.int64),
        "test_images": np.zeros((10, 32, 32, 3), np.uint8),
        "test_labels": np.arange(10, dtype=np.int64),
    }
    f = tmp_path / "c.npz"
    cache.save_cache(f, good, "ab" * 32)
    assert cache.load_cache(f, "ab" * 32) is not None
    for key, bad in [
        ("train_images", np.zeros((10, 31, 32, 3), np.uint8)),
        ("test_images", np.zeros((10, 32, 32, 3), np.float32)),
        ("train_labels", np.arange(9, dtype=np.int64)),
        ("test_labels", np.arange(1, 11, dtype=np.int64)),
    ]:
        cache.save_cache(f, {**good, key: bad}, "ab" * 32)
        assert cache.load_cache(f, "ab" * 32) is None, key


def test_a_cache_write_removes_old_temp_files_of_killed_writes_only(tmp_path):
    """A killed write leaves `.<name>.*.tmp` (a full cache is ~180 MB): the next write removes those an
    hour old, and keeps a younger one that another data-parallel rank may be writing right now."""
    arrays = {"train_images": np.zeros((10, 32, 32, 3), np.uint8), "train_labels": np.arange(10, dtype=np.int64),
              "test_images": np.zeros((10, 32, 32, 3), np.uint8), "test_labels": np.arange(10, dtype=np.int64)}
    old, young = tmp_path / ".c.npz.old.tmp", tmp_path / ".c.npz.young.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    past = time.time() - cache.STALE_TEMP_SECONDS - 60
    os.utime(old, (past, past))
    cache.save_cache(tmp_path / "c.npz", arrays, "ab" * 32)
    assert not old.exists() and young.exists()
    assert cache.load_cache(tmp_path / "c.npz", "ab" * 32) is not None
