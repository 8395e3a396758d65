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
from dataclasses import dataclass

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


RULES = ("dsr", "set", "rigl")


@dataclass(frozen=True)
class DropAndGrow:
    """The settings of a per-tensor rule: ``name`` "set" or "rigl", drop fraction ``alpha`` (RigL's
    default 0.3), and for rigl ``t_end``, the step of its last update and its cosine's horizon
    (RigL's default: 75% of the training steps)."""

    name: str
    alpha: float = 0.3
    t_end: int | None = None

    def __post_init__(self):
        if self.name not in ("set", "rigl"):
            raise ValueError(f"rule must be one of {RULES}, got {self.name!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha (the drop fraction) must be in (0, 1], got {self.alpha}")
        if self.name == "rigl" and (self.t_end is None or self.t_end <= 0):
            raise ValueError(f"rule 'rigl' needs t_end, a positive step (RigL: 75% of the training steps), "
                             f"got {self.t_end}")

    @property
    def needs_gradients(self) -> bool:
        return self.name == "rigl"

    def active_at(self, step: int) -> bool:
        """Whether the rule still updates at ``step`` (RigL stops at t_end)."""
        return self.t_end is None or step < self.t_end

    def drop_fraction(self, step: int) -> float:
        return self.alpha if self.name == "set" else cosine_drop_fraction(step, self.alpha, self.t_end)

    def update(self, segments: Segments, scores: torch.Tensor, mask: torch.Tensor, grad_scores: torch.Tensor | None,
               step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(survived, grown), bool [n] each, of one update at ``step``."""
        alpha = self.drop_fraction(step)
        if self.name == "set":
            return set_update(segments, scores, mask, alpha, generator)
        if grad_scores is None:
            raise ValueError("rule 'rigl' needs the gradient magnitude of every unit at an update step")
        return rigl_update(segments, scores, grad_scores, mask, alpha, generator)


@dataclass(frozen=True)
class DropGrowResult:
    """What one SET / RigL update did: bool [n] masks over the flat units (on the device; the counts
    are read only when asked for, each a host sync)."""

    survived: torch.Tensor
    regrown: torch.Tensor
    drop_fraction: float

    @property
    def mask(self) -> torch.Tensor:
        return self.survived | self.regrown

    @property
    def pruned(self) -> int:
        return int(self.regrown.sum())
