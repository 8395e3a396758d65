"""Per-tensor drop-and-grow rules beside DSR: SET and RigL, for any unit (element or block).

Both rules, per sparse tensor i with n_i active units of size_i:

1. drop d_i = min(floor(alpha * n_i), size_i - n_i) active units with the smallest magnitude
   (|w|, or mean |w| of a block);
2. grow d_i units among those inactive before the drop (the just-dropped are not eligible):
   **set** (Mocanu et al. 2018) draws them uniformly at random, **rigl** (Evci et al. 2020) takes
   those with the largest gradient magnitude (|dL/dW| of the dense weight, or mean |g| of a block),
   ties broken by the seeded generator.

So every tensor keeps exactly its count (d_i never exceeds the free units). Grown units start at
zero with zero optimizer state (the storage's ``set_structure``). RigL decays the drop fraction
by a cosine, ``alpha_t = alpha / 2 (1 + cos(pi t / T_end))``, and stops updating at ``T_end``.

Everything runs on the device over all tensors at once (``Segments``), with no host sync at all:
the counts d_i never leave the device. Randomness comes from a generator seeded by (seed, step).
"""

from __future__ import annotations

import math

import torch

from .select import Segments


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's schedule: ``alpha / 2 (1 + cos(pi step / t_end))``, 0 from ``t_end`` on."""
    if step >= t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / t_end))


def drop_counts(segments: Segments, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """int64 [T] on the device: d_i = min(floor(alpha n_i), size_i - n_i) for bool mask [n]."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the drop fraction) must be in [0, 1], got {alpha}")
    active = segments.count(mask)
    return torch.minimum((active.double() * alpha).floor().long(), segments.size_tensor - active)


def _smallest_active(segments: Segments, scores: torch.Tensor, mask: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
    """bool [n]: in each tensor the counts[i] active units of smallest score (ties by position)."""
    keys = torch.where(mask, scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))
    return segments.select_smallest(keys, counts)


def _largest_tiebroken(segments: Segments, scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """bool [n]: in each tensor the counts[i] eligible units of largest score, ties broken at random
    (a random permutation first, then stable sorts by score and by tensor)."""
    n = segments.total
    perm = torch.randperm(n, generator=generator, device=scores.device)
    keys = torch.where(eligible, -scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))[perm]
    order = perm[torch.argsort(keys, stable=True)]
    order = order[torch.argsort(segments.ids[order], stable=True)]  # by tensor, then by score, then random
    rank = torch.arange(n, device=scores.device) - segments.starts[segments.ids[order]]
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    chosen[order] = (rank < counts[segments.ids[order]]) & eligible[order]
    return chosen


def set_update(segments: Segments, scores: torch.Tensor, mask: torch.Tensor, alpha: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SET: drop the smallest, grow as many at random. scores float [n], mask bool [n].
    Returns (survived, grown), bool [n] each."""
    counts = drop_counts(segments, mask, alpha)
    dropped = _smallest_active(segments, scores, mask, counts)
    grown = segments.select_random(~mask, counts, generator)
    return mask & ~dropped, grown


def rigl_update(segments: Segments, scores: torch.Tensor, grad_scores: torch.Tensor, mask: torch.Tensor,
                alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RigL: drop the smallest, grow as many of the largest gradient magnitude among the inactive.
    scores, grad_scores float [n] (grad_scores of every unit, active or not), mask bool [n].
    Returns (survived, grown), bool [n] each."""
    counts = drop_counts(segments, mask, alpha)
    dropped = _smallest_active(segments, scores, mask, counts)
    grown = _largest_tiebroken(segments, grad_scores, ~mask, counts, generator)
    return mask & ~dropped, grown
