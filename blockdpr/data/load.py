"""The public loader: resolve the source, use its cache or decode it once, return :class:`CIFAR10`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import cache, sources
from .dataset import (
    BUNDLED_DESCRIPTION, BUNDLED_NAME, BUNDLED_SHA256, CIFAR10, HOW_TO_GET, OFFICIAL_DESCRIPTION, REPO_ROOT, DataError,
)
from .download import download_cifar10


def _download_dir(path) -> Path:
    """Where ``--download`` puts the archive: ``path`` (a directory, or the archive's own directory),
    default the repo's ``data/``."""
    if path is None:
        return REPO_ROOT / "data"
    p = Path(path).expanduser()
    if p.name.endswith((".tar.gz", ".tgz")):
        return p.parent
    return p


def load_cifar10(path=None, *, download=False, cache_dir=None, progress=True) -> CIFAR10:
    """Load CIFAR-10 as uint8 HWC tensors on the CPU (the sources are listed in :mod:`blockdpr.data`).

    ``path``: a zip, ``cifar-10-batches-py`` directory, ``cifar-10-python.tar.gz`` or a
    directory containing one; ``None`` means :func:`.sources.default_data_path`.
    ``download``: fetch the official archive (md5-checked) into ``path`` (a directory;
    default the repo's ``data/``) unless already there, and load it.
    ``cache_dir``: where to keep the decoded ``.npz`` (default beside the source, falling
    back to ``$BLOCKDPR_CACHE`` or ``~/.cache/blockdpr`` when that is not writable).
    ``progress``: show a rich progress bar while decoding.
    Raises :class:`DataError` for missing, corrupt or malformed data.
    """
    if download:
        path = download_cifar10(_download_dir(path), progress=progress)
    kind, src = sources.resolve_source(path)
    checksum = sources.source_checksum(kind, src)
    if kind == "zip" and src.name == BUNDLED_NAME and checksum != BUNDLED_SHA256:
        raise DataError(
            f"{src} is corrupt: its sha256 is {checksum}, expected {BUNDLED_SHA256} for "
            f"the bundled {BUNDLED_DESCRIPTION}. Replace it with an intact copy. {HOW_TO_GET}"
        )
    if kind == "zip":
        description = BUNDLED_DESCRIPTION if checksum == BUNDLED_SHA256 else f"CIFAR-10 (JPEG zip {src.name})"
    else:
        description = OFFICIAL_DESCRIPTION

    name = cache.cache_name(checksum)
    dirs = cache.cache_dirs(src, cache_dir)
    arrays = None
    for d in dirs:
        arrays = cache.load_cache(d / name, checksum)
        if arrays is not None:
            break
    if arrays is None:
        arrays = sources.decode_source(kind, src, progress)
        cache.check_arrays(arrays)
        errors = []
        for d in dirs:
            try:
                cache.save_cache(d / name, arrays, checksum)
                break
            except OSError as e:  # a read-only data folder: try the next place
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
