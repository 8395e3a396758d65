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
there with :func:`augment` / :func:`augment_trials` (vectorised: reflect padding, random crop, random
horizontal flip, normalisation).  Images are returned as float32
``[B, 3, 32, 32]`` in channels_last memory format.

One module per job: :mod:`.dataset` (constants, :class:`CIFAR10`, :class:`DataError`),
:mod:`.sources` (finding and fingerprinting a source), :mod:`.jpeg_zip` and :mod:`.batches`
(the two formats), :mod:`.unpickle` (the restricted unpickler), :mod:`.download`,
:mod:`.cache` (decode-once cache), :mod:`.load` (:func:`load_cifar10`) and :mod:`.augmentation`.
"""

from .augmentation import augment, augment_trials, epoch_permutation, normalize
from .dataset import (
    BATCH_DIR_NAME,
    BUNDLED_DESCRIPTION,
    BUNDLED_NAME,
    BUNDLED_SHA256,
    CIFAR10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_TAR_MD5,
    CIFAR10_TAR_NAME,
    CIFAR10_URL,
    CLASSES,
    IMAGE_SHAPE,
    META_FILE,
    OFFICIAL_DESCRIPTION,
    REPO_ROOT,
    TEST_BATCH,
    TRAIN_BATCHES,
    DataError,
)
from .download import download_cifar10
from .load import load_cifar10
from .sources import default_data_path

__all__ = [
    "BATCH_DIR_NAME", "BUNDLED_DESCRIPTION", "BUNDLED_NAME", "BUNDLED_SHA256", "CIFAR10", "CIFAR10_MEAN",
    "CIFAR10_STD", "CIFAR10_TAR_MD5", "CIFAR10_TAR_NAME", "CIFAR10_URL", "CLASSES", "IMAGE_SHAPE", "META_FILE",
    "OFFICIAL_DESCRIPTION", "REPO_ROOT", "TEST_BATCH", "TRAIN_BATCHES", "DataError", "augment", "augment_trials",
    "default_data_path", "download_cifar10", "epoch_permutation", "load_cifar10", "normalize",
]
