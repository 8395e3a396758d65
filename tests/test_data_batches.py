"""Tests of blockdpr.data reading the official python batches (directory and .tar.gz), of the
restricted unpickler, and of the download (network monkeypatched away)."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
from data_fixtures import batch, load, py2_pickle, tar_dir, write_batches

from blockdpr import data
from blockdpr.data import DataError, load_cifar10
from blockdpr.data import batches, download


def test_batch_dir_loads(tmp_path):
    d, expected = write_batches(tmp_path / "src")
    for source in (d, d.parent):  # the directory itself, or its parent
        ds = load(source, tmp_path)
        for k, v in expected.items():
            assert np.array_equal(getattr(ds, k).numpy(), v), k
        assert ds.description == "CIFAR-10 (official python batches)"
        assert ds.source == str(d.resolve())
    h = hashlib.sha256()
    for f in (*data.TRAIN_BATCHES, data.TEST_BATCH):
        h.update((d / f).read_bytes())
    assert ds.checksum == h.hexdigest()


def test_batch_tar_loads_in_memory(tmp_path, monkeypatch):
    d, expected = write_batches(tmp_path / "src")
    tar = tar_dir(d, tmp_path / data.CIFAR10_TAR_NAME)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # nothing may be extracted into the working directory
    for source in (tar, tmp_path):  # the archive, or a directory holding it
        ds = load(source, tmp_path / "cache")
        for k, v in expected.items():
            assert np.array_equal(getattr(ds, k).numpy(), v), k
        assert ds.source == str(tar.resolve())
        assert ds.checksum == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert ds.description == "CIFAR-10 (official python batches)"
    assert list(out.iterdir()) == []


def test_batch_tar_missing_member(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_4").unlink()
    tar = tar_dir(d, tmp_path / "x.tar.gz")
    with pytest.raises(DataError, match="lacks data_batch_4"):
        load(tar, tmp_path)


def test_batch_dir_missing_file(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3") as err:
        load(d, tmp_path)
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
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_2").write_bytes(batch(20, 0, **kwargs)[0])
    with pytest.raises(DataError, match=match) as err:
        load(d, tmp_path)
    assert "data_batch_2" in str(err.value)


def test_batch_dir_rejects_too_few_classes(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    (d / data.TEST_BATCH).write_bytes(batch(20, 0, labels=[3] * 20)[0])
    with pytest.raises(DataError, match="test batches contain 1 classes"):
        load(d, tmp_path)


def test_batch_dir_rejects_wrong_meta(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    (d / data.META_FILE).write_bytes(py2_pickle({b"label_names": [b"a"] * 10}))
    with pytest.raises(DataError, match="label_names"):
        load(d, tmp_path)


def test_restricted_unpickler_blocks_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match=r"forbidden global os\.system"):
        load(d, tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_blocks_reduce_gadgets(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))

    d, _ = write_batches(tmp_path / "src")
    (d / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match=r"forbidden global builtins\.eval"):
        load(d, tmp_path)


def test_python3_protocol2_batches_load(tmp_path):
    """Batches re-pickled by Python 3 at protocol 2 store bytes through _codecs.encode(..., 'latin1')."""
    d, expected = write_batches(tmp_path / "src")
    for k, name in enumerate((*data.TRAIN_BATCHES, data.TEST_BATCH)):
        images = expected["test_images"] if name == data.TEST_BATCH else expected["train_images"][20 * k : 20 * (k + 1)]
        labels = expected["test_labels"] if name == data.TEST_BATCH else expected["train_labels"][20 * k : 20 * (k + 1)]
        batch_dict = {"batch_label": "py3", "labels": labels.tolist(), "data": images.transpose(0, 3, 1, 2).reshape(-1, 3072)}
        raw = pickle.dumps(batch_dict, protocol=2)
        assert b"_codecs\nencode" in raw  # what the old unpickler refused
        (d / name).write_bytes(raw)
    ds = load(d, tmp_path)
    for key, value in expected.items():
        assert np.array_equal(getattr(ds, key).numpy(), value), key


class _Reduces:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_still_blocks_os_system_in_protocol2(tmp_path, protocol):
    marker = tmp_path / "pwned"
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_1").write_bytes(pickle.dumps({"data": _Reduces(os.system, f"touch {marker}")}, protocol=protocol))
    with pytest.raises(DataError, match=r"data_batch_1: refusing to unpickle forbidden global (os|posix)\.system"):
        load(d, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("args", [("eW91", "base64"), ("abc", "rot13"), (b"abc", "latin1")])
def test_codecs_encode_is_allowed_only_for_latin1_text(tmp_path, args):
    d, _ = write_batches(tmp_path / "src")
    (d / "test_batch").write_bytes(pickle.dumps({"data": _Reduces(codecs.encode, *args)}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: refusing _codecs\.encode"):
        load(d, tmp_path)


def test_oversized_batch_file_is_refused_before_reading(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    with open(d / "data_batch_3", "r+b") as f:  # sparse: costs no disk
        f.truncate(batches.MAX_BATCH_BYTES + 1)
    with pytest.raises(DataError, match=rf"data_batch_3 is {batches.MAX_BATCH_BYTES + 1:,} bytes, larger than"):
        load(d, tmp_path)


class _Zeros(io.RawIOBase):
    """A stream of ``n`` zero bytes that never holds them all in memory."""

    def __init__(self, n: int):
        self.left = n

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k

    def readable(self) -> bool:
        return True


def test_oversized_tar_member_is_refused_without_reading_it(tmp_path):
    """A huge member compresses to almost nothing; it must be refused from its header."""
    size = batches.MAX_BATCH_BYTES + 1
    tar = tmp_path / data.CIFAR10_TAR_NAME
    with tarfile.open(tar, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo(f"{data.BATCH_DIR_NAME}/data_batch_1")
        info.size = size
        tf.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    assert tar.stat().st_size < size // 100
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"member '{data.BATCH_DIR_NAME}/data_batch_1' is {size:,} bytes"):
            load(tar, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"reading the archive allocated {peak:,} bytes at its peak"


def test_batch_not_a_pickle(tmp_path):
    d, _ = write_batches(tmp_path / "src")
    (d / "data_batch_5").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="not a valid CIFAR-10 batch"):
        load(d, tmp_path)


def test_download_checks_md5(tmp_path, monkeypatch):
    d, expected = write_batches(tmp_path / "src")
    good = tar_dir(d, tmp_path / "good.tar.gz").read_bytes()
    calls = []

    def fake_fetch(url, progress=True):
        calls.append(url)
        yield payload[:1000]
        yield payload[1000:]

    monkeypatch.setattr(download, "fetch", fake_fetch)
    dest = tmp_path / "dl"

    payload = good + b"tampered"
    monkeypatch.setattr(download, "CIFAR10_TAR_MD5", hashlib.md5(good).hexdigest())
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
    def dropped(url, progress=True):
        yield b"the first chunk"
        raise OSError("Network is unreachable")

    monkeypatch.setattr(download, "fetch", dropped)
    with pytest.raises(DataError, match="Network is unreachable.*bundled"):
        data.download_cifar10(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # the partial download was removed
