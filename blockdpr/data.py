"""CIFAR-10 loading, caching and on-device augmentation.

Sources accepted by :func:`load_cifar10` (``--data PATH``):

* the bundled ``data/cifar10-jpeg-q75.zip`` -- CIFAR-10 (JPEG q75): every image
  stored as a JPEG of quality 75 under ``train/<class>/NNNN.jpg`` and
  ``test/<class>/NNNN.jpg``; other zips with the same layout are accepted too;
* the official python version: a ``cifar-10-batches-py`` directory, or the
  ``cifar-10-python.tar.gz`` archive (read in memory, never extracted);
* a directory containing one of those.

The source is decoded once into uint8 arrays ``[N, 32, 32, 3]`` (HWC, RGB) and
cached as an uncompressed ``.npz`` beside it (``<source dir>/cache/``), keyed by
the source's sha256; when that directory is not writable the cache goes to
``$BLOCKDPR_CACHE`` or ``~/.cache/blockdpr``.

Training keeps the whole uint8 dataset on the device and augments batches
there with :func:`augment` (vectorised: reflect padding, random crop, random
horizontal flip, normalisation).  Images are returned as float32
``[B, 3, 32, 32]`` in channels_last memory format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import os
import pickle
import re
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

CIFAR10_MEAN = (125.3, 123.0, 113.9)  # per-channel RGB mean, 0..255 scale
CIFAR10_STD = (63.0, 62.1, 66.7)  # per-channel RGB std, 0..255 scale
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

BUNDLED_NAME = "cifar10-jpeg-q75.zip"
BUNDLED_SHA256 = "ace8b142dc9447bcc18adb207a4739c61747c2236b3e1a29faedb3b43fbe06f5"
BUNDLED_DESCRIPTION = "CIFAR-10 (JPEG q75)"
OFFICIAL_DESCRIPTION = "CIFAR-10 (official python batches)"

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_NAME = "cifar-10-python.tar.gz"
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"

IMAGE_SHAPE = (32, 32, 3)  # HWC
_CACHE_VERSION = 1
_MAX_JPEG_BYTES = 1 << 20  # a 32x32 JPEG is ~1 kB; anything huge is not CIFAR
_POOL_MIN_IMAGES = 4096  # below this, decoding in-process beats starting workers

REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(RuntimeError):
    """The dataset is missing, corrupt or malformed; the message says how to fix it."""


_HOW_TO_GET = (
    f"A fresh clone of the repository contains data/{BUNDLED_NAME} ({BUNDLED_DESCRIPTION}); "
    f"a copy may also be at ../shared/datasets/{BUNDLED_NAME}. Alternatively pass "
    f"--data PATH (a zip with the same layout, a {BATCH_DIR_NAME} directory, "
    f"{CIFAR10_TAR_NAME}, or a directory containing one of those), or --download to "
    f"fetch the official archive from {CIFAR10_URL}."
)


# ---------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CIFAR10:
    """CIFAR-10 split into train/test, images as uint8 HWC tensors.

    ``train_images``: uint8 ``[N_train, 32, 32, 3]``; ``train_labels``: int64
    ``[N_train]`` in ``0..9`` (index into :data:`CLASSES`); likewise for test.
    ``source`` is the resolved path read, ``checksum`` its sha256 (for a batch
    directory: sha256 over the six batch files in order), ``description`` a
    human-readable name such as ``"CIFAR-10 (JPEG q75)"``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    checksum: str
    description: str

    def to(self, device) -> "CIFAR10":
        """Return a copy with all four tensors on ``device``."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def subset(self, n_train: int | None, n_test: int | None) -> "CIFAR10":
        """First ``n_train`` / ``n_test`` examples of each split (``None`` keeps all).

        The zip loader orders images by number then class, so the first n of a
        split cover all classes about equally (the official batches are shuffled).
        """
        for n in (n_train, n_test):
            if n is not None and n < 0:
                raise ValueError(f"subset sizes must be >= 0 or None, got {n}")
        tr = slice(None) if n_train is None else slice(0, n_train)
        te = slice(None) if n_test is None else slice(0, n_test)
        return dataclasses.replace(
            self,
            train_images=self.train_images[tr],
            train_labels=self.train_labels[tr],
            test_images=self.test_images[te],
            test_labels=self.test_labels[te],
        )

    def __repr__(self) -> str:
        return (
            f"CIFAR10({self.description}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, device={self.train_images.device}, "
            f"source={self.source!r}, sha256={self.checksum[:16]}...)"
        )


# ---------------------------------------------------------------------------
# Finding the source
# ---------------------------------------------------------------------------


def _default_candidates() -> list[Path]:
    """Where the bundled zip is looked for, in order."""
    return [
        REPO_ROOT / "data" / BUNDLED_NAME,
        REPO_ROOT.parent / "shared" / "datasets" / BUNDLED_NAME,
    ]


def default_data_path() -> Path:
    """The repo's ``data/cifar10-jpeg-q75.zip``, else ``../shared/datasets/`` beside the
    repo; if neither exists, the repo path (so errors name the expected place)."""
    candidates = _default_candidates()
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _resolve_source(path: str | os.PathLike | None) -> tuple[str, Path]:
    """Map a user path to ``(kind, resolved path)``; kind is "zip", "tar" or "batches"."""
    if path is None:
        p = default_data_path()
        if not p.exists():
            looked = ", ".join(str(c) for c in _default_candidates())
            raise DataError(f"CIFAR-10 not found; looked for {looked}. {_HOW_TO_GET}")
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"CIFAR-10 not found: {p} does not exist. {_HOW_TO_GET}")
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
            f"{TRAIN_BATCHES[0]} etc. directly in it. {_HOW_TO_GET}"
        )
    if p.name.endswith(".zip"):
        return "zip", p
    if p.name.endswith((".tar.gz", ".tgz")):
        return "tar", p
    if zipfile.is_zipfile(p):
        return "zip", p
    if tarfile.is_tarfile(p):
        return "tar", p
    raise DataError(f"{p} is neither a zip, a .tar.gz nor a directory. {_HOW_TO_GET}")


def _hash_file(path: Path, algorithm: str = "sha256", h=None) -> str:
    """Hex digest of a file, read in 1 MiB chunks (``h`` continues an existing hash)."""
    h = h or hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _source_checksum(kind: str, path: Path) -> str:
    """sha256 of the source file; for a batch directory, over the batch files in order."""
    if kind != "batches":
        return _hash_file(path)
    h = hashlib.sha256()
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH) if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"{path} is not a complete {BATCH_DIR_NAME} directory: missing "
            f"{', '.join(missing)}. {_HOW_TO_GET}"
        )
    for f in (*TRAIN_BATCHES, TEST_BATCH):
        _hash_file(path / f, h=h)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Reading the JPEG zip
# ---------------------------------------------------------------------------

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
                f"path or '..'); refusing to read this archive. {_HOW_TO_GET}"
            )
        if info.is_dir():
            continue
        m = _ZIP_ENTRY.fullmatch(name)
        if m is None or _ZIP_IMAGE.fullmatch(m[3]) is None:
            raise DataError(
                f"{path}: unexpected zip entry {name!r}; every file must be "
                f"(train|test)/<class>/<digits>.jpg. {_HOW_TO_GET}"
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
                f"CIFAR-10 classes (missing: {', '.join(missing)}). {_HOW_TO_GET}"
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
    global _worker_zip
    _worker_zip = zipfile.ZipFile(path)


def _pool_decode(job: tuple[int, list[str]]) -> tuple[int, np.ndarray]:
    start, names = job
    return start, _decode_jpegs(_worker_zip, names)


def _progress_bar(description: str, total: int, enabled: bool):
    """A rich progress bar on stderr, or None when disabled."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    progress.add_task(description, total=total)
    return progress


def _worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _decode_zip(path: Path, progress: bool) -> dict[str, np.ndarray]:
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
        bar = _progress_bar(f"Decoding {path.name}", len(names), progress)
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


# ---------------------------------------------------------------------------
# Reading the official python batches (directory or .tar.gz)
# ---------------------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs (numpy array
    reconstruction); any other global raises :class:`DataError` before anything runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(
                f"{self._where}: refusing to unpickle forbidden global {module}.{name}; "
                f"a CIFAR-10 batch only contains numpy arrays and lists. The file is "
                f"corrupt or malicious. {_HOW_TO_GET}"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def _unpickle(raw: bytes, where: str) -> dict:
    """Load one batch pickle (Python-2 format) with the restricted unpickler."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), where).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: not a valid CIFAR-10 batch pickle ({e}). {_HOW_TO_GET}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Batch pickle -> (uint8 ``[n, 32, 32, 3]``, int64 ``[n]``).

    ``data`` is uint8 ``[n, 3072]`` channel-planar (1024 R, 1024 G, 1024 B, each
    row-major 32x32); ``labels`` a list of n ints in 0..9.
    """
    d = _unpickle(raw, where)
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
    names = _unpickle(raw, where).get("label_names")
    if names is not None:
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        if names != CLASSES:
            raise DataError(f"{where}: label_names {names} are not the 10 CIFAR-10 classes.")


def _assemble_batches(raws: dict[str, bytes], where: str) -> dict[str, np.ndarray]:
    """Combine raw batch files ``{file name: bytes}`` into the four arrays."""
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


def _read_batch_dir(path: Path) -> dict[str, np.ndarray]:
    wanted = (*TRAIN_BATCHES, TEST_BATCH)
    missing = [f for f in wanted if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"{path} is not a complete {BATCH_DIR_NAME} directory: missing "
            f"{', '.join(missing)}. {_HOW_TO_GET}"
        )
    raws = {f: (path / f).read_bytes() for f in (*wanted, META_FILE) if (path / f).is_file()}
    return _assemble_batches(raws, str(path))


def _read_batch_tar(path: Path) -> dict[str, np.ndarray]:
    """Read the batch members of the official .tar.gz in memory (nothing is extracted)."""
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
                raws[base] = tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); it may be corrupt. {_HOW_TO_GET}") from None
    missing = [f for f in (*TRAIN_BATCHES, TEST_BATCH) if f not in raws]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}. {_HOW_TO_GET}")
    return _assemble_batches(raws, str(path))


def _decode_source(kind: str, path: Path, progress: bool) -> dict[str, np.ndarray]:
    """Read a source into the four numpy arrays (the slow path the cache avoids)."""
    if kind == "zip":
        try:
            return _decode_zip(path, progress)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a valid zip ({e}); it may be corrupt. {_HOW_TO_GET}") from None
    if kind == "tar":
        return _read_batch_tar(path)
    return _read_batch_dir(path)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_dirs(kind: str, path: Path, cache_dir) -> list[Path]:
    """Candidate cache directories, preferred first."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    fallback = os.environ.get("BLOCKDPR_CACHE") or Path.home() / ".cache" / "blockdpr"
    return [path.parent / "cache", Path(fallback).expanduser()]


def _cache_name(checksum: str) -> str:
    return f"cifar10-{checksum[:16]}.npz"


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the arrays look like a CIFAR-10 dataset."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"{split}_images: {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"{split}_labels: {labels.dtype} {labels.shape}")
        if labels.size == 0 or labels.min() < 0 or labels.max() >= len(CLASSES):
            raise ValueError(f"{split}_labels out of range")


def _load_cache(file: Path, checksum: str) -> dict[str, np.ndarray] | None:
    """Arrays from a cache file, or None if it is absent, stale or corrupt.

    The npz members carry zip CRCs, so a flipped bit fails the read; the stored
    source checksum, format version and shapes/dtypes are checked as well.
    """
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            if str(npz["checksum"]) != checksum or int(npz["version"]) != _CACHE_VERSION:
                raise ValueError("stale")
            arrays = {k: npz[k] for k in _ARRAY_KEYS}
        _check_arrays(arrays)
        return arrays
    except Exception:  # truncated / garbled / stale: rebuild
        return None


def _save_cache(file: Path, arrays: dict[str, np.ndarray], checksum: str) -> None:
    """Write the cache atomically: a temp file in the same directory, then os.replace."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.stem}.{os.getpid()}.npz.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, checksum=np.array(checksum), version=np.array(_CACHE_VERSION), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------


def _download_dir(path) -> Path:
    if path is None:
        return REPO_ROOT / "data"
    p = Path(path).expanduser()
    if p.name.endswith((".tar.gz", ".tgz")):
        return p.parent
    return p


def load_cifar10(path=None, *, download=False, cache_dir=None, progress=True) -> CIFAR10:
    """Load CIFAR-10 as uint8 HWC tensors on the CPU (see the module docstring for sources).

    ``path``: a zip, ``cifar-10-batches-py`` directory, ``cifar-10-python.tar.gz`` or a
    directory containing one; ``None`` means :func:`default_data_path`.
    ``download``: fetch the official archive (md5-checked) into ``path`` (a directory;
    default the repo's ``data/``) unless already there, and load it.
    ``cache_dir``: where to keep the decoded ``.npz`` (default beside the source, falling
    back to ``$BLOCKDPR_CACHE`` or ``~/.cache/blockdpr`` when that is not writable).
    ``progress``: show a rich progress bar while decoding.
    Raises :class:`DataError` for missing, corrupt or malformed data.
    """
    if download:
        path = download_cifar10(_download_dir(path), progress=progress)
    kind, src = _resolve_source(path)
    checksum = _source_checksum(kind, src)
    if kind == "zip" and src.name == BUNDLED_NAME and checksum != BUNDLED_SHA256:
        raise DataError(
            f"{src} is corrupt: its sha256 is {checksum}, expected {BUNDLED_SHA256} for "
            f"the bundled {BUNDLED_DESCRIPTION}. Replace it with an intact copy. {_HOW_TO_GET}"
        )
    if kind == "zip":
        description = BUNDLED_DESCRIPTION if checksum == BUNDLED_SHA256 else f"CIFAR-10 (JPEG zip {src.name})"
    else:
        description = OFFICIAL_DESCRIPTION

    name = _cache_name(checksum)
    dirs = _cache_dirs(kind, src, cache_dir)
    arrays = None
    for d in dirs:
        arrays = _load_cache(d / name, checksum)
        if arrays is not None:
            break
    if arrays is None:
        arrays = _decode_source(kind, src, progress)
        _check_arrays(arrays)
        errors = []
        for d in dirs:
            try:
                _save_cache(d / name, arrays, checksum)
                break
            except OSError as e:  # read-only (e.g. ../shared): try the next place
                errors.append(f"{d}: {e}")
        else:
            if progress:
                print(f"warning: could not write the CIFAR-10 cache ({'; '.join(errors)})", file=sys.stderr)

    return CIFAR10(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        source=str(src),
        checksum=checksum,
        description=description,
    )


# ---------------------------------------------------------------------------
# Download (for users who are online)
# ---------------------------------------------------------------------------


def _fetch(url: str, dest: Path, progress: bool = True) -> None:
    """Stream ``url`` into the file ``dest``."""
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        bar = _progress_bar(f"Downloading {url.rsplit('/', 1)[-1]}", total, progress)
        if bar is not None:
            bar.start()
        try:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                if bar is not None:
                    bar.advance(0, len(chunk))
        finally:
            if bar is not None:
                bar.stop()


def download_cifar10(dest_dir, *, progress: bool = True) -> Path:
    """Download the official ``cifar-10-python.tar.gz`` into ``dest_dir`` and verify its md5.

    Returns the path of the verified archive; an existing file with the right md5
    is reused.  Raises :class:`DataError` if the download fails or the md5 differs.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest = dest_dir / CIFAR10_TAR_NAME
    if dest.is_file() and _hash_file(dest, "md5") == CIFAR10_TAR_MD5:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        try:
            _fetch(CIFAR10_URL, tmp, progress)
        except OSError as e:  # includes urllib.error.URLError
            raise DataError(
                f"downloading {CIFAR10_URL} failed ({e}). Without internet, use the "
                f"bundled data/{BUNDLED_NAME} (the default) or --data PATH."
            ) from None
        md5 = _hash_file(tmp, "md5")
        if md5 != CIFAR10_TAR_MD5:
            raise DataError(
                f"downloaded {CIFAR10_URL} has md5 {md5}, expected {CIFAR10_TAR_MD5}; "
                f"the download is corrupt, try again (nothing was kept)."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------
# On-device batching and augmentation
# ---------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """int64 ``[n]`` permutation of ``0..n-1``, a function of ``(seed, epoch)`` only.

    Generated on the CPU (so it is the same on every device type), then moved.
    """
    digest = hashlib.sha256(f"blockdpr-permutation:{seed}:{epoch}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(n, generator=g, dtype=torch.int64).to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 32, 32, 3]`` -> float32 ``[B, 3, 32, 32]``, (x - mean) / std per channel,
    in channels_last memory format (on the input's device)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(CIFAR10_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    # permute of a contiguous NHWC tensor already has channels_last strides
    x = images.permute(0, 3, 1, 2).float()
    return ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)


_PAD = 4


def _augment_params(batch: int, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """Random crop offsets ``dy, dx`` in ``0..8`` (into the 40x40 padded image) and flip
    flags, each int64/bool ``[batch]``, drawn in this order from ``generator``."""
    dy = torch.randint(0, 2 * _PAD + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * _PAD + 1, (batch,), generator=generator, device=device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return dy, dx, flip


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a batch, entirely on ``images.device``, no per-image loop.

    uint8 ``[B, 32, 32, 3]`` -> float32 ``[B, 3, 32, 32]`` (channels_last), equal to:
    reflect-pad by 4 pixels, take a random 32x32 crop, flip horizontally with
    probability 1/2, then :func:`normalize`.  ``generator`` must live on the same
    device; the result is deterministic given its state.  Implemented as one gather
    with per-image row/column indices (reflection folded into the indices).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"expected uint8 [B, 32, 32, 3], got {images.dtype} {tuple(images.shape)}")
    b, h, w, _ = images.shape
    device = images.device
    dy, dx, flip = _augment_params(b, generator, device)
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    # padded coordinate p = i + offset maps to source p - PAD, reflected into [0, size)
    rows = (ar_h[None, :] + dy[:, None] - _PAD).abs()
    rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)  # [B, 32]
    cols = (ar_w[None, :] + dx[:, None] - _PAD).abs()
    cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)  # [B, 32]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=device)[:, None, None]
    out = images[batch_idx, rows[:, :, None], cols[:, None, :]]  # uint8 [B, 32, 32, 3]
    return normalize(out)
