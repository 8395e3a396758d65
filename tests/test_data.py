"""Tests for blockdpr.data: sources, validation, cache, download, augmentation.

All fixtures are tiny and synthetic (built in tmp_path); one test reads the real
bundled zip and is skipped when it is absent.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blockdpr import data
from blockdpr.data import (
    BUNDLED_SHA256,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    DataError,
    augment,
    epoch_permutation,
    load_cifar10,
    normalize,
)

PER_CLASS = {"train": 3, "test": 2}


# ---------------------------------------------------------------------------
# Fixture builders
# ---------------------------------------------------------------------------


def _image(label: int, index: int) -> np.ndarray:
    """A smooth 32x32 RGB image that survives JPEG well and encodes its class."""
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 4 + label * 10, y * 4 + index * 5, np.full_like(x, 25 * label)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=kw.pop("format", "JPEG"), quality=95, **kw)
    return buf.getvalue()


def _zip_entries(per_class=PER_CLASS, classes=CLASSES) -> dict[str, bytes]:
    entries = {}
    for split, n in per_class.items():
        for label, cls in enumerate(classes):
            for i in range(n):
                entries[f"{split}/{cls}/{i:04d}.jpg"] = _jpeg(_image(label, i))
    return entries


def _write_zip(path: Path, entries: dict[str, bytes], dirs=()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, payload in entries.items():
            zf.writestr(zipfile.ZipInfo(name), payload)
    return path


@pytest.fixture
def tiny_zip(tmp_path) -> Path:
    return _write_zip(tmp_path / "tiny.zip", _zip_entries())


class _Py2Pickler(pickle._Pickler):
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


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _batch(n: int, seed: int, labels=None, data_shape=None) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch pickle with n images (labels cycle through all classes) and its HWC images."""
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    planar = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)
    if data_shape is not None:
        planar = rng.integers(0, 256, data_shape, dtype=np.uint8)
    labels = [i % 10 for i in range(n)] if labels is None else labels
    raw = _py2_pickle({b"batch_label": b"fixture", b"labels": labels, b"data": planar})
    return raw, hwc, np.array(labels, dtype=np.int64)


def _write_batches(root: Path, n: int = 20) -> tuple[Path, dict[str, np.ndarray]]:
    d = root / data.BATCH_DIR_NAME
    d.mkdir(parents=True)
    train_imgs, train_lbls = [], []
    for k, name in enumerate(data.TRAIN_BATCHES):
        raw, hwc, lbl = _batch(n, seed=k)
        (d / name).write_bytes(raw)
        train_imgs.append(hwc)
        train_lbls.append(lbl)
    raw, test_hwc, test_lbl = _batch(n, seed=99)
    (d / data.TEST_BATCH).write_bytes(raw)
    (d / data.META_FILE).write_bytes(_py2_pickle({b"label_names": [c.encode() for c in CLASSES]}))
    expected = {
        "train_images": np.concatenate(train_imgs),
        "train_labels": np.concatenate(train_lbls),
        "test_images": test_hwc,
        "test_labels": test_lbl,
    }
    return d, expected


def _tar_dir(batch_dir: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(batch_dir, arcname=data.BATCH_DIR_NAME)
    return dest


def _load(path, tmp_path, **kw):
    return load_cifar10(path, cache_dir=tmp_path / "cache", progress=False, **kw)


# ---------------------------------------------------------------------------
# Zip source
# ---------------------------------------------------------------------------


def test_tiny_zip_loads(tiny_zip, tmp_path):
    ds = _load(tiny_zip, tmp_path)
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
        diff = ds.test_images[k].int() - torch.from_numpy(_image(label, index)).int()
        assert diff.abs().float().mean() < 3
    assert ds.source == str(tiny_zip.resolve())
    assert ds.checksum == hashlib.sha256(tiny_zip.read_bytes()).hexdigest()
    assert "JPEG" in ds.description


def test_zip_with_directory_entries_and_directory_source(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    dirs = ["train/", "test/"] + [f"{s}/{c}/" for s in ("train", "test") for c in CLASSES]
    _write_zip(d / "any.zip", _zip_entries(), dirs=dirs)
    ds = _load(d / "any.zip", tmp_path)
    assert len(ds.train_labels) == 30


def test_zip_decoded_in_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(data, "_worker_count", lambda: 2)
    z = _write_zip(tmp_path / "p.zip", _zip_entries())
    pooled = _load(z, tmp_path / "a")
    monkeypatch.setattr(data, "_POOL_MIN_IMAGES", 10**9)
    serial = _load(z, tmp_path / "b")
    assert torch.equal(pooled.train_images, serial.train_images)
    assert torch.equal(pooled.test_labels, serial.test_labels)
    # a bad image found by a worker surfaces as a DataError in the parent
    monkeypatch.setattr(data, "_POOL_MIN_IMAGES", 0)
    entries = _zip_entries()
    entries["train/frog/0002.jpg"] = _jpeg(np.zeros((30, 32, 3), np.uint8))
    bad = _write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match="train/frog/0002.jpg"):
        _load(bad, tmp_path / "c")


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
    entries = _zip_entries()
    entries[name] = _jpeg(_image(0, 0))
    z = _write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match=match):
        _load(z, tmp_path)


def test_zip_rejects_escaping_directory_entry(tmp_path):
    z = _write_zip(tmp_path / "bad.zip", _zip_entries(), dirs=["../up/"])
    with pytest.raises(DataError, match="escapes"):
        _load(z, tmp_path)


@pytest.mark.parametrize(
    "payload, match",
    [
        (_jpeg(np.zeros((32, 31, 3), np.uint8)), "31x32"),
        (_jpeg(np.zeros((32, 32), np.uint8)), "mode L"),
        (_jpeg(np.zeros((32, 32, 3), np.uint8), format="PNG"), "PNG"),
        (b"not an image", "cannot decode"),
    ],
)
def test_zip_rejects_bad_images(tmp_path, payload, match):
    entries = _zip_entries()
    entries["test/dog/0001.jpg"] = payload
    z = _write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match=match) as err:
        _load(z, tmp_path)
    assert "test/dog/0001.jpg" in str(err.value)


def test_zip_rejects_nine_classes(tmp_path):
    z = _write_zip(tmp_path / "nine.zip", _zip_entries(classes=CLASSES[:9]))
    with pytest.raises(DataError, match="found 9 classes.*missing: truck"):
        _load(z, tmp_path)


def test_zip_rejects_duplicate_numbers(tmp_path):
    entries = _zip_entries()
    entries["train/cat/0.jpg"] = entries["train/cat/0000.jpg"]
    z = _write_zip(tmp_path / "dup.zip", entries)
    with pytest.raises(DataError, match="same number"):
        _load(z, tmp_path)


def test_not_a_zip(tmp_path):
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="not a valid zip"):
        _load(z, tmp_path)


def test_bundled_name_sha256_mismatch(tmp_path):
    z = _write_zip(tmp_path / data.BUNDLED_NAME, _zip_entries())
    with pytest.raises(DataError, match="corrupt") as err:
        _load(z, tmp_path)
    msg = str(err.value)
    assert BUNDLED_SHA256 in msg and str(z) in msg and "fresh clone" in msg


def test_directory_containing_bundled_name_is_found(tmp_path):
    z = _write_zip(tmp_path / data.BUNDLED_NAME, _zip_entries())
    with pytest.raises(DataError, match="corrupt"):  # found it, then checked it
        _load(tmp_path, tmp_path)
    assert z.exists()


# ---------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------


def test_missing_path_names_where_it_looked(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(DataError, match="does not exist") as err:
        _load(missing, tmp_path)
    assert str(missing) in str(err.value) and "--download" in str(err.value)


def test_empty_directory_names_what_it_looked_for(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(DataError) as err:
        _load(d, tmp_path)
    msg = str(err.value)
    assert str(d) in msg and data.BUNDLED_NAME in msg and data.CIFAR10_TAR_NAME in msg


def test_default_path_missing(tmp_path, monkeypatch):
    cands = [tmp_path / "repo" / "data" / data.BUNDLED_NAME, tmp_path / "shared" / data.BUNDLED_NAME]
    monkeypatch.setattr(data, "_default_candidates", lambda: cands)
    assert data.default_data_path() == cands[0]
    with pytest.raises(DataError) as err:
        load_cifar10(None, cache_dir=tmp_path / "c", progress=False)
    assert all(str(c) in str(err.value) for c in cands)


def test_default_path_falls_back_to_shared(tmp_path, monkeypatch):
    cands = [tmp_path / "repo" / data.BUNDLED_NAME, tmp_path / "shared" / data.BUNDLED_NAME]
    cands[1].parent.mkdir()
    cands[1].write_bytes(b"x")
    monkeypatch.setattr(data, "_default_candidates", lambda: cands)
    assert data.default_data_path() == cands[1]


def test_real_default_path():
    p = data.default_data_path()
    assert p.name == data.BUNDLED_NAME
    if (data.REPO_ROOT / "data" / data.BUNDLED_NAME).exists():
        assert p == data.REPO_ROOT / "data" / data.BUNDLED_NAME
    assert data._default_candidates()[1] == data.REPO_ROOT.parent / "shared" / "datasets" / data.BUNDLED_NAME


# ---------------------------------------------------------------------------
# Official python batches
# ---------------------------------------------------------------------------


def test_batch_dir_loads(tmp_path):
    d, expected = _write_batches(tmp_path / "src")
    for source in (d, d.parent):  # the directory itself, or its parent
        ds = _load(source, tmp_path)
        for k, v in expected.items():
            assert np.array_equal(getattr(ds, k).numpy(), v), k
        assert ds.description == "CIFAR-10 (official python batches)"
        assert ds.source == str(d.resolve())
    h = hashlib.sha256()
    for f in (*data.TRAIN_BATCHES, data.TEST_BATCH):
        h.update((d / f).read_bytes())
    assert ds.checksum == h.hexdigest()


def test_batch_tar_loads_in_memory(tmp_path, monkeypatch):
    d, expected = _write_batches(tmp_path / "src")
    tar = _tar_dir(d, tmp_path / data.CIFAR10_TAR_NAME)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # nothing may be extracted into the working directory
    for source in (tar, tmp_path):  # the archive, or a directory holding it
        ds = _load(source, tmp_path / "cache")
        for k, v in expected.items():
            assert np.array_equal(getattr(ds, k).numpy(), v), k
        assert ds.source == str(tar.resolve())
        assert ds.checksum == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert ds.description == "CIFAR-10 (official python batches)"
    assert list(out.iterdir()) == []


def test_batch_tar_missing_member(tmp_path):
    d, _ = _write_batches(tmp_path / "src")
    (d / "data_batch_4").unlink()
    tar = _tar_dir(d, tmp_path / "x.tar.gz")
    with pytest.raises(DataError, match="lacks data_batch_4"):
        _load(tar, tmp_path)


def test_batch_dir_missing_file(tmp_path):
    d, _ = _write_batches(tmp_path / "src")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3") as err:
        _load(d, tmp_path)
    assert str(d) in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data_shape=(20, 3071)), r"uint8 array \[n, 3072\]"),
        (dict(labels=[i % 10 for i in range(19)] + [10]), "labels must be in 0..9"),
        (dict(labels=[-1] * 20), "labels must be in 0..9"),
        (dict(labels=list(range(10)) * 2 + [0]), "one label per image"),
    ],
)
def test_batch_dir_rejects_bad_batch(tmp_path, kwargs, match):
    d, _ = _write_batches(tmp_path / "src")
    (d / "data_batch_2").write_bytes(_batch(20, 0, **kwargs)[0])
    with pytest.raises(DataError, match=match) as err:
        _load(d, tmp_path)
    assert "data_batch_2" in str(err.value)


def test_batch_dir_rejects_too_few_classes(tmp_path):
    d, _ = _write_batches(tmp_path / "src")
    (d / data.TEST_BATCH).write_bytes(_batch(20, 0, labels=[3] * 20)[0])
    with pytest.raises(DataError, match="test batches contain 1 classes"):
        _load(d, tmp_path)


def test_batch_dir_rejects_wrong_meta(tmp_path):
    d, _ = _write_batches(tmp_path / "src")
    (d / data.META_FILE).write_bytes(_py2_pickle({b"label_names": [b"a"] * 10}))
    with pytest.raises(DataError, match="label_names"):
        _load(d, tmp_path)


def test_restricted_unpickler_blocks_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    d, _ = _write_batches(tmp_path / "src")
    (d / "data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match=r"forbidden global os\.system"):
        _load(d, tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_blocks_reduce_gadgets(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))

    d, _ = _write_batches(tmp_path / "src")
    (d / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match=r"forbidden global builtins\.eval"):
        _load(d, tmp_path)


def test_batch_not_a_pickle(tmp_path):
    d, _ = _write_batches(tmp_path / "src")
    (d / "data_batch_5").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="not a valid CIFAR-10 batch"):
        _load(d, tmp_path)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def _fail(*a, **k):
    raise AssertionError("decoder called although the cache should have been used")


def test_cache_is_used_on_second_load(tiny_zip, tmp_path, monkeypatch):
    first = _load(tiny_zip, tmp_path)
    files = list((tmp_path / "cache").glob("cifar10-*.npz"))
    assert [f.name for f in files] == [f"cifar10-{first.checksum[:16]}.npz"]
    monkeypatch.setattr(data, "_decode_source", _fail)
    second = _load(tiny_zip, tmp_path)
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
    monkeypatch.setattr(data, "_decode_source", _fail)
    assert torch.equal(load_cifar10(tiny_zip, progress=False).train_images, ds.train_images)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "stale"])
def test_corrupt_cache_is_rebuilt(tiny_zip, tmp_path, damage):
    first = _load(tiny_zip, tmp_path)
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    raw = bytearray(cache.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        # flip a byte inside the train_images array payload
        start = raw.find(b"train_images.npy")
        raw[start + 2000] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"junk")
    else:  # a cache recorded for some other source
        arrays = {k: getattr(first, k).numpy() for k in data._ARRAY_KEYS}
        data._save_cache(cache, arrays, "0" * 64)
        raw = bytearray(cache.read_bytes())
    cache.write_bytes(bytes(raw))
    second = _load(tiny_zip, tmp_path)
    assert torch.equal(first.train_images, second.train_images)
    assert data._load_cache(cache, first.checksum) is not None  # rewritten intact


def test_wrong_shape_cache_is_rejected(tmp_path):
    good = {
        "train_images": np.zeros((10, 32, 32, 3), np.uint8),
        "train_labels": np.arange(10, dtype=np.int64),
        "test_images": np.zeros((10, 32, 32, 3), np.uint8),
        "test_labels": np.arange(10, dtype=np.int64),
    }
    f = tmp_path / "c.npz"
    data._save_cache(f, good, "ab" * 32)
    assert data._load_cache(f, "ab" * 32) is not None
    for key, bad in [
        ("train_images", np.zeros((10, 31, 32, 3), np.uint8)),
        ("test_images", np.zeros((10, 32, 32, 3), np.float32)),
        ("train_labels", np.arange(9, dtype=np.int64)),
        ("test_labels", np.arange(1, 11, dtype=np.int64)),
    ]:
        data._save_cache(f, {**good, key: bad}, "ab" * 32)
        assert data._load_cache(f, "ab" * 32) is None, key


# ---------------------------------------------------------------------------
# Download (network monkeypatched away)
# ---------------------------------------------------------------------------


def test_download_checks_md5(tmp_path, monkeypatch):
    d, expected = _write_batches(tmp_path / "src")
    good = _tar_dir(d, tmp_path / "good.tar.gz").read_bytes()
    calls = []

    def fake_fetch(url, dest, progress=True):
        calls.append(url)
        Path(dest).write_bytes(payload)

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    dest = tmp_path / "dl"

    payload = good + b"tampered"
    monkeypatch.setattr(data, "CIFAR10_TAR_MD5", hashlib.md5(good).hexdigest())
    with pytest.raises(DataError, match="md5"):
        data.download_cifar10(dest, progress=False)
    assert not (dest / data.CIFAR10_TAR_NAME).exists()
    assert list(dest.iterdir()) == []  # the partial file was removed

    payload = good
    path = data.download_cifar10(dest, progress=False)
    assert path == dest / data.CIFAR10_TAR_NAME and path.read_bytes() == good
    assert calls == [data.CIFAR10_URL] * 2

    ds = load_cifar10(dest, download=True, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 2  # verified archive reused, not fetched again
    assert np.array_equal(ds.test_images.numpy(), expected["test_images"])
    assert ds.source == str(path.resolve())


def test_download_network_error(tmp_path, monkeypatch):
    def offline(url, dest, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(DataError, match="Network is unreachable.*bundled"):
        data.download_cifar10(tmp_path, progress=False)


# ---------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------


def test_subset_and_to(tiny_zip, tmp_path):
    ds = _load(tiny_zip, tmp_path)
    sub = ds.subset(7, None)
    assert len(sub.train_labels) == 7 and len(sub.test_labels) == 20
    assert torch.equal(sub.train_images, ds.train_images[:7])
    assert len(ds.subset(None, 0).test_images) == 0
    moved = ds.to("cpu")
    assert moved.checksum == ds.checksum and moved.train_images.device.type == "cpu"
    assert "train=30" in repr(ds)
    with pytest.raises(ValueError):
        ds.subset(-1, None)


# ---------------------------------------------------------------------------
# Permutation, normalisation, augmentation
# ---------------------------------------------------------------------------


def test_epoch_permutation():
    p = epoch_permutation(1000, seed=3, epoch=5, device="cpu")
    assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(1000))
    assert torch.equal(p, epoch_permutation(1000, 3, 5, torch.device("cpu")))
    assert not torch.equal(p, epoch_permutation(1000, 3, 6, "cpu"))
    assert not torch.equal(p, epoch_permutation(1000, 4, 5, "cpu"))


def test_normalize():
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    y = normalize(x)
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    ref = (x.permute(0, 3, 1, 2).float() - mean) / std
    torch.testing.assert_close(y, ref)
    # constant images equal to the mean normalise to zero, mean + std to one
    at_mean = torch.tensor(CIFAR10_MEAN).round().to(torch.uint8).expand(2, 32, 32, 3).contiguous()
    torch.testing.assert_close(normalize(at_mean), (at_mean.permute(0, 3, 1, 2).float() - mean) / std)
    assert normalize(at_mean).abs().max() < 0.01


def _reference_augment(images, dy, dx, flip):
    """Per-image reference: F.pad reflect, crop, flip, normalise."""
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="reflect")
    outs = []
    for i in range(images.shape[0]):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        outs.append(crop.flip(-1) if flip[i] else crop)
    x = torch.stack(outs).round().to(torch.uint8).permute(0, 2, 3, 1)
    return normalize(x.contiguous())


def test_augment_matches_reference():
    images = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (256, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    dy, dx, flip = data._augment_params(256, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(out, _reference_augment(images, dy, dx, flip))
    # all nine offsets and both flip states occur
    assert set(dy.tolist()) == set(range(9)) == set(dx.tolist())
    assert 0.3 < flip.float().mean() < 0.7


def test_augment_deterministic_per_seed():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(augment(images, g), augment(images, g))  # generator advances


def test_augment_known_pattern_flips_crops_and_reflects():
    # pixel value encodes (row, col): R = 4*col, G = 4*row, B = 0
    row, col = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([col * 4, row * 4, torch.zeros_like(row)], -1).to(torch.uint8)
    images = img.expand(512, 32, 32, 3).contiguous()
    out = augment(images, torch.Generator().manual_seed(7))
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    raw = (out * std + mean).round()  # back to 0..255
    src_col = raw[:, 0] / 4  # [B, 32, 32]: source column of each output pixel
    src_row = raw[:, 1] / 4
    assert torch.all(src_col == src_col[:, :1, :])  # columns constant down each column
    step = src_col[:, 0, 16] - src_col[:, 0, 15]  # the centre never reflects
    flipped = step < 0
    assert 0.3 < flipped.float().mean() < 0.7  # real flips, about half
    dy, dx, flip = data._augment_params(512, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(flipped, flip)
    # rows: source row of output row i is reflect(i + dy - 4)
    first_row = src_row[:, 0, 0]
    expected_first = (dy - 4).abs().float()
    assert torch.equal(first_row, expected_first)
    assert (first_row != 0).any()  # real crops
    # reflect padding (not edge replicate): dy = 0 gives rows 4, 3, 2, 1, 0, 1, 2, ...
    i = int(torch.nonzero(dy == 0)[0])
    assert src_row[i, :7, 0].tolist() == [4, 3, 2, 1, 0, 1, 2]
    j = int(torch.nonzero(dy == 8)[0])
    assert src_row[j, -6:, 0].tolist() == [30, 31, 30, 29, 28, 27]
    # no pixel outside 0..31 ever appears
    assert src_col.min() >= 0 and src_col.max() <= 31


def test_augment_rejects_wrong_input():
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 32, 32, 3))


# ---------------------------------------------------------------------------
# The real bundled dataset
# ---------------------------------------------------------------------------

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
