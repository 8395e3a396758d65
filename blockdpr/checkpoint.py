"""Atomic checkpoint writes and safe, validated loads.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts saved with torch.save; it is
written to a temporary file in the same directory, flushed to disk and renamed over the target,
so a kill at any moment leaves either the old or the new file, never a torn one. Loading uses
torch.load(weights_only=True), which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run that tries to load it."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save a training checkpoint, stamped with the format version."""
    save_atomic({"format_version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely and check it belongs to this run.

    expect: keys that must be equal in the checkpoint's "identity" dict (e.g. granularity,
    model depth and width, mode); a mismatch raises CheckpointError naming each difference.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a blockdpr checkpoint of format {FORMAT_VERSION} (found {found!r})")
    if expect:
        identity = state.get("identity", {})
        wrong = [f"{k}: checkpoint has {identity.get(k)!r}, this run has {v!r}" for k, v in expect.items() if identity.get(k) != v]
        if wrong:
            raise CheckpointError(f"checkpoint {path} is from an incompatible run: " + "; ".join(wrong))
    return state
