"""A restricted unpickler for the official CIFAR-10 python batches.

It resolves only the globals a batch needs -- numpy array reconstruction and, for batches
re-pickled by Python 3 at protocol 2, ``_codecs.encode`` restricted to latin-1 (how protocol 2
stores ``bytes``) -- and raises :class:`DataError` for any other global before anything runs.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from .dataset import HOW_TO_GET, DataError


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text, encoding="utf-8", errors="strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: ``str`` -> ``bytes`` in latin-1, nothing else."""
    normalized = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or normalized not in ("latin1", "iso88591"):
        raise DataError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): a CIFAR-10 pickle only "
            f"encodes text as latin-1. The file is corrupt or malicious."
        )
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs; any other global raises
    :class:`DataError` naming it, before anything runs. ``where`` names the file in errors."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
    }

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str):
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise DataError(
                f"{self._where}: refusing to unpickle forbidden global {module}.{name}; "
                f"a CIFAR-10 batch only contains numpy arrays and lists. The file is "
                f"corrupt or malicious. {HOW_TO_GET}"
            )
        return resolve()


def unpickle(raw: bytes, where: str) -> dict:
    """Load one batch pickle (Python 2, or Python 3 up to protocol 5) with the restricted
    unpickler; returns the dict with ``bytes`` keys decoded as latin-1 ``str``."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), where).load()
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except Exception as e:
        raise DataError(f"{where}: not a valid CIFAR-10 batch pickle ({e}). {HOW_TO_GET}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
