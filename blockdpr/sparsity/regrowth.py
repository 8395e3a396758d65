"""How many units each tensor regrows: the exact, unbiased integer split of (l_i / L) K.

The real-valued target of tensor i is its proportional share of the K regrown units, capped at
its free units (a capped tensor's excess goes to the others in proportion, repeatedly: "water
filling"). The integer split takes the floor of every target and hands out the remaining units
by systematic sampling with inclusion probability equal to each fractional part, in a random
order, so E[r_i] equals the target exactly (no tensor is favoured by its size), every r_i is its
target's floor or ceiling, and sum r_i == K.
"""

from __future__ import annotations

import numpy as np


def capped_shares(weights: np.ndarray, capacity: np.ndarray, total: int) -> np.ndarray:
    """Real-valued split of ``total`` in proportion to ``weights``, never above ``capacity``.

    weights: float64 [T] (>= 0); capacity: int64 [T] (>= 0) with capacity.sum() >= total.
    Returns float64 [T] x with x.sum() == total (up to rounding) and 0 <= x <= capacity. A
    tensor whose share would exceed its capacity gets exactly its capacity and the rest is split
    again over the others; when none of the others has weight, they share it equally.
    One round per newly capped group of tensors (at most T rounds).
    """
    x = np.zeros(len(weights), dtype=np.float64)
    open_ = capacity > 0
    left = float(total)
    while left > 0 and open_.any():
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = open_.astype(np.float64)
        share = left * w / w.sum()
        capped = open_ & (share >= capacity)
        if not capped.any():
            x[open_] = share[open_]
            break
        x[capped] = capacity[capped]
        left -= float(capacity[capped].sum())
        open_ &= ~capped
    return x


def round_unbiased(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integers r [T] with sum(r) == round(sum(x)), r_i in {floor(x_i), ceil(x_i)}, E[r_i] == x_i.

    x: float64 [T] (>= 0) summing to an integer up to floating-point rounding. The units left
    after the floors are drawn by systematic sampling over the fractional parts (one uniform
    offset, points offset + 0, 1, 2, ...) laid out in a random order, which selects each tensor
    with probability exactly its fractional part and never twice. Returns int64 [T].
    """
    base = np.floor(x).astype(np.int64)
    extra = int(round(float(x.sum()))) - int(base.sum())
    if extra <= 0:
        return base
    order = rng.permutation(len(x))
    edges = np.cumsum((x - base)[order])
    edges *= extra / edges[-1]  # remove the rounding drift, so that exactly `extra` points fall inside
    edges[-1] = extra
    hits = np.diff(np.ceil(edges - rng.random()), prepend=0.0).astype(np.int64)
    base[order] += hits
    return base


def split_regrowth(surviving: np.ndarray, free: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` regrown units over tensors in proportion to ``surviving``, exactly and unbiased.

    surviving, free: int64 [T] (surviving l_i and free units of each tensor); total: K.
    Returns int64 [T] r with r.sum() == total, 0 <= r <= free and E[r] equal to the capped
    proportional share (:func:`capped_shares`), so no tensor gains or loses units on average.
    A second round runs only if floating-point rounding pushed an r_i past its free units.
    Raises ValueError if the tensors do not have ``total`` free units between them.
    """
    surviving = np.asarray(surviving, dtype=np.int64)
    free = np.asarray(free, dtype=np.int64)
    if surviving.shape != free.shape or surviving.ndim != 1:
        raise ValueError(f"surviving and free must be 1-d of equal length, got {surviving.shape} and {free.shape}")
    if (surviving < 0).any() or (free < 0).any():
        raise ValueError("surviving and free counts must be >= 0")
    if free.sum() < total:
        raise ValueError(f"cannot regrow {total} units: only {int(free.sum())} free units in all tensors")
    r = np.zeros_like(free)
    while (left := int(total) - int(r.sum())) > 0:
        room = free - r
        share = round_unbiased(capped_shares(surviving.astype(np.float64), room, left), rng)
        r += np.minimum(share, room)
    return r
