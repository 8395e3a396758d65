"""Dynamic parameter reallocation (Mostafa & Wang, Algorithm 1), written once for any unit.

A *unit* is an element (element mode) or a whole block (block mode). The reallocator sees one
flat vector of unit magnitudes over all sparse tensors and one flat activity mask; it

1. prunes every active unit whose magnitude is below the global threshold H (k_i pruned and
   l_i surviving in tensor i), never emptying a tensor: if all of a tensor's units fall below
   H its strongest one is kept;
2. moves H toward the target pruned count N_p: halve it if K = sum k_i > (1 + delta) N_p,
   double it if K < (1 - delta) N_p (this affects the next reallocation);
3. regrows r_i ~ (l_i / L) K units in tensor i, uniformly at random among its inactive units
   (excluding the ones just pruned), rounded so that sum r_i == K exactly and r_i never exceeds
   the tensor's free units. The number of active units is therefore conserved exactly.

All per-unit work runs on the device, vectorised over all tensors at once; the only host sync
is one small transfer of the per-tensor counts (needed for the exact integer split of K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .regrowth import split_regrowth
from .select import Segments, seeded_generator


@dataclass(frozen=True)
class DPRConfig:
    """Hyper-parameters of DPR (paper defaults)."""

    target_pruned: int = 20_000  # N_p, units pruned per reallocation once H has adapted
    tolerance: float = 0.1  # delta
    initial_threshold: float = 0.001  # H at step 0

    def __post_init__(self):
        if self.target_pruned <= 0:
            raise ValueError(f"target_pruned must be positive, got {self.target_pruned}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.initial_threshold <= 0:
            raise ValueError(f"initial_threshold must be positive, got {self.initial_threshold}")


@dataclass(frozen=True)
class ReallocationResult:
    """What one reallocation did. Masks are bool [n] over the flat unit vector."""

    survived: torch.Tensor  # active before and not pruned
    regrown: torch.Tensor  # inactive before, active now
    pruned_per_tensor: np.ndarray  # int64 [T], k_i
    regrown_per_tensor: np.ndarray  # int64 [T], r_i
    threshold_used: float  # H this reallocation pruned with
    threshold_next: float  # H after adaptation

    @property
    def mask(self) -> torch.Tensor:
        return self.survived | self.regrown

    @property
    def pruned(self) -> int:
        return int(self.pruned_per_tensor.sum())


class Reallocator:
    """Algorithm 1 over the units of T sparse tensors with `sizes` units each.

    The threshold H is the only state (`state_dict` / `load_state_dict`); it is a Python float so
    that checkpoints and logs read it directly. Randomness comes from generators seeded by (seed,
    step). A reallocation refuses non-finite scores (FloatingPointError, nothing changed): a NaN
    weight must never be pruned into a masked NaN.
    """

    def __init__(self, sizes: list[int], config: DPRConfig, seed: int, device: torch.device | str = "cpu"):
        self.segments = Segments(sizes, device)
        self.config = config
        self.seed = int(seed)
        self.threshold = float(config.initial_threshold)

    def state_dict(self) -> dict:
        """{"threshold": H}: what a checkpoint needs to continue exactly."""
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        threshold = float(state["threshold"])
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"reallocator state: threshold must be finite and positive, got {threshold}")
        self.threshold = threshold

    def reallocate(self, scores: torch.Tensor, mask: torch.Tensor, step: int) -> ReallocationResult:
        """One reallocation.

        scores: float [n], magnitude of every unit (|w| for elements, mean |w| for blocks).
        mask: bool [n], the active units. step: the training step (seeds the randomness).
        """
        seg = self.segments
        if scores.shape != (seg.total,) or mask.shape != (seg.total,):
            raise ValueError(
                f"scores and mask must both have shape ({seg.total},), got {tuple(scores.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool, got {mask.dtype}")

        # 1. Prune below H; keep the strongest unit of any tensor that would be emptied.
        survived = mask & (scores >= self.threshold)
        kept, active = seg.count(torch.stack([survived, mask]))
        emptied = (kept == 0) & (active > 0)
        survived |= seg.first_largest(scores, mask) & emptied[seg.ids]
        pruned = mask & ~survived

        # The one host sync: per-tensor pruned, surviving, free and non-finite counts (4 x T ints).
        counts = seg.count(torch.stack([pruned, survived, ~mask, ~torch.isfinite(scores)])).cpu().numpy()
        k, l, free, nonfinite = counts
        if nonfinite.any():
            raise FloatingPointError(f"non-finite (NaN or infinite) weights in sparse tensors {np.flatnonzero(nonfinite).tolist()}: "
                                     "training diverged, refusing to reallocate")
        total_pruned = int(k.sum())

        # 2. Move H toward the target pruned count (affects the next reallocation).
        used = self.threshold
        cfg = self.config
        if total_pruned > (1 + cfg.tolerance) * cfg.target_pruned:
            self.threshold = used / 2
        elif total_pruned < (1 - cfg.tolerance) * cfg.target_pruned:
            self.threshold = used * 2

        # 3. Regrow exactly K units, split over tensors in proportion to l_i.
        rng = np.random.default_rng([self.seed, int(step)])
        eligible = ~mask
        if free.sum() < total_pruned:  # only at very high density: allow the just-pruned units
            free, eligible = free + k, ~survived
        r = split_regrowth(l, free, total_pruned, rng)
        generator = seeded_generator(scores.device, self.seed, step)
        regrown = seg.select_random(eligible, torch.as_tensor(r, device=scores.device), generator)
        return ReallocationResult(survived, regrown, k, r, used, self.threshold)
