"""Tests of blockdpr.data reading a JPEG zip, finding the source, and the real bundled zip.

All fixtures are tiny and synthetic (built in tmp_path, see data_fixtures.py); one test reads
the real bundled zip and is skipped when it is absent.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
from data_fixtures import image, jpeg, load, tiny_zip, zip_entries, write_zip  # noqa: F401 (tiny_zip: fixture)

from blockdpr import data
from blockdpr.data import BUNDLED_SHA256, CLASSES, DataError, load_cifar10
from blockdpr.data import jpeg_zip, sources


def test_tiny_zip_loads(tiny_zip, tmp_path):
    ds = load(tiny_zip, tmp_path)
    assert ds.train_images.shape == (30, 32, 32, 3) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (20, 32, 32, 3)
    assert ds.train_labels.dtype == torch.int64
    assert torch.bincount(ds.train_labels).tolist() == [3] * 10
    assert torch.bincount(ds.test_labels).tolist() == [2] * 10
    # ordered by (number, class): any prefix of 10 holds every class once
    assert ds.train_labels[:10].tolist() == list(range(10))
    # pixels match the source images up to JPEG error, with the right labels
    for k in range(len(ds.test_labels)):
        label, index = int(ds.test_labels[k]), k // 10
        diff = ds.test_images[k].int() - torch.from_numpy(image(label, index)).int()
        assert diff.abs().float().mean() < 3
    assert ds.source == str(tiny_zip.resolve())
    assert ds.checksum == hashlib.sha256(tiny_zip.read_bytes()).hexdigest()
    assert "JPEG" in ds.description


def test_zip_with_directory_entries_and_directory_source(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    dirs = ["train/", "test/"] + [f"{s}/{c}/" for s in ("train", "test") for c in CLASSES]
    write_zip(d / "any.zip", zip_entries(), dirs=dirs)
    ds = load(d / "any.zip", tmp_path)
    assert len(ds.train_labels) == 30


def test_zip_decoded_in_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(jpeg_zip, "_POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(jpeg_zip, "_worker_count", lambda: 2)
    z = write_zip(tmp_path / "p.zip", zip_entries())
    pooled = load(z, tmp_path / "a")
    monkeypatch.setattr(jpeg_zip, "_POOL_MIN_IMAGES", 10**9)
    serial = load(z, tmp_path / "b")
    assert torch.equal(pooled.train_images, serial.train_images)
    assert torch.equal(pooled.test_labels, serial.test_labels)
    # a bad image found by a worker surfaces as a DataError in the parent
    monkeypatch.setattr(jpeg_zip, "_POOL_MIN_IMAGES", 0)
    entries = zip_entries()
    entries["train/frog/0002.jpg"] = jpeg(np.zeros((30, 32, 3), np.uint8))
    bad = write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match="train/frog/0002.jpg"):
        load(bad, tmp_path / "c")


def test_progress_bar_smoke(tiny_zip, tmp_path, capsys):
    ds = load_cifar10(tiny_zip, cache_dir=tmp_path / "cache", progress=True)
    assert len(ds.train_labels) == 30
    assert "Decoding tiny.zip" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, match",
    [
        ("../evil.jpg", "escapes"),
        ("train/../../evil.jpg", "escapes"),
        ("/abs/evil.jpg", "escapes"),
        ("train/zebra/0000.jpg", "unknown class 'zebra'"),
        ("readme.txt", "unexpected zip entry"),
        ("train/cat/0000.png", "unexpected zip entry"),
        ("train/cat/extra/0000.jpg", "unexpected zip entry"),
    ],
)
def test_zip_rejects_bad_entries(tmp_path, name, match):
    entries = zip_entries()
    entries[name] = jpeg(image(0, 0))
    z = write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match=match):
        load(z, tmp_path)


def test_zip_rejects_escaping_directory_entry(tmp_path):
    z = write_zip(tmp_path / "bad.zip", zip_entries(), dirs=["../up/"])
    with pytest.raises(DataError, match="escapes"):
        load(z, tmp_path)


@pytest.mark.parametrize(
    "payload, match",
    [
        (jpeg(np.zeros((32, 31, 3), np.uint8)), "31x32"),
        (jpeg(np.zeros((32, 32), np.uint8)), "mode L"),
        (jpeg(np.zeros((32, 32, 3), np.uint8), format="PNG"), "PNG"),
        (b"not an image", "cannot decode"),
    ],
)
def test_zip_rejects_bad_images(tmp_path, payload, match):
    entries = zip_entries()
    entries["test/dog/0001.jpg"] = payload
    z = write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match=match) as err:
        load(z, tmp_path)
    assert "test/dog/0001.jpg" in str(err.value)


def test_zip_rejects_nine_classes(tmp_path):
    z = write_zip(tmp_path / "nine.zip", zip_entries(classes=CLASSES[:9]))
    with pytest.raises(DataError, match="found 9 classes.*missing: truck"):
        load(z, tmp_path)


def test_zip_rejects_duplicate_numbers(tmp_path):
    entries = zip_entries()
    entries["train/cat/0.jpg"] = entries["train/cat/0000.jpg"]
    z = write_zip(tmp_path / "dup.zip", entries)
    with pytest.raises(DataError, match="same number"):
        load(z, tmp_path)


def test_not_a_zip(tmp_path):
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="not a valid zip"):
        load(z, tmp_path)


def test_bundled_name_sha256_mismatch(tmp_path):
    z = write_zip(tmp_path / data.BUNDLED_NAME, zip_entries())
    with pytest.raises(DataError, match="corrupt") as err:
        load(z, tmp_path)
    msg = str(err.value)
    assert BUNDLED_SHA256 in msg and str(z) in msg and "fresh clone" in msg


def test_directory_containing_bundled_name_is_found(tmp_path):
    z = write_zip(tmp_path / data.BUNDLED_NAME, zip_entries())
    with pytest.raises(DataError, match="corrupt"):  # found it, then checked it
        load(tmp_path, tmp_path)
    assert z.exists()


def test_missing_path_names_where_it_looked(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(DataError, match="does not exist") as err:
        load(missing, tmp_path)
    assert str(missing) in str(err.value) and "--download" in str(err.value)


def test_empty_directory_names_what_it_looked_for(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(DataError) as err:
        load(d, tmp_path)
    msg = str(err.value)
    assert str(d) in msg and data.BUNDLED_NAME in msg and data.CIFAR10_TAR_NAME in msg


def test_default_path_missing(tmp_path, monkeypatch):
    default = tmp_path / "repo" / "data" / data.BUNDLED_NAME
    monkeypatch.setattr(sources, "default_data_path", lambda: default)
    with pytest.raises(DataError) as err:
        load_cifar10(None, cache_dir=tmp_path / "c", progress=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and str(default) in lines[0] and "--data PATH" in lines[1]


def test_real_default_path():
    assert data.default_data_path() == data.REPO_ROOT / "data" / data.BUNDLED_NAME


BUNDLED = data.REPO_ROOT / "data" / data.BUNDLED_NAME


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled CIFAR-10 zip not present")
def test_real_bundled_zip():
    """Reads data/cifar10-jpeg-q75.zip (decodes once, ~10-20 s, then uses data/cache/)."""
    ds = load_cifar10(BUNDLED, progress=False)
    assert ds.description == "CIFAR-10 (JPEG q75)" and ds.checksum == BUNDLED_SHA256
    assert ds.train_images.shape == (50_000, 32, 32, 3)
    assert ds.test_images.shape == (10_000, 32, 32, 3)
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.train_labels[:10].tolist() == list(range(10))
    pixels = torch.cat([ds.train_images, ds.test_images]).reshape(-1, 3)
    means = pixels.double().mean(0)
    torch.testing.assert_close(means, torch.tensor([125.4, 123.1, 114.0], dtype=torch.float64), atol=0.5, rtol=0)
    t = time.perf_counter()
    again = load_cifar10(BUNDLED, progress=False)
    assert time.perf_counter() - t < 10  # from the cache
    assert torch.equal(again.test_images, ds.test_images)
