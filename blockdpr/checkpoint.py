"""Checkpoints: atomic writes (blockdpr.runinfo) and safe, validated loads.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts saved with torch.save through
blockdpr.runinfo.atomic_write (temp file, fsync, rename), so a kill at any moment leaves either
the old or the new file, never a torn one. Loading uses torch.load(weights_only=True), which
refuses arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .runinfo import atomic_write

# 2: the reallocator's state_dict and the run's metrics records are part of the checkpoint.
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run that tries to load it."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save a training checkpoint, stamped with the format version."""
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


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
