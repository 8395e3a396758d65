"""What CIFAR-10 is here: its constants, the :class:`CIFAR10` container and :class:`DataError`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

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
IMAGE_SHAPE = (32, 32, 3)  # HWC

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

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

HOW_TO_GET = (
    f"A fresh clone has data/{BUNDLED_NAME}; else give --data PATH (such a zip, {BATCH_DIR_NAME}/ "
    f"or {CIFAR10_TAR_NAME}) or --download."
)


class DataError(RuntimeError):
    """The dataset is missing, corrupt or malformed; the message says how to fix it."""


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
