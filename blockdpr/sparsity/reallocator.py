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
`reallocate_together` does this for the trials of one process at once (one sync, one sort pair
in all), each trial getting exactly what its reallocator alone would give.
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
    active_per_tensor: np.ndarray  # int64 [T], l_i + r_i: each tensor's units after it (on the host)
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
        self._joined: dict[tuple[int, ...], Segments] = {}  # joined_segments, by the sizes of every tensor

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
        return reallocate_together([self], [scores], [mask], step)[0]

    def check_inputs(self, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """ValueError / TypeError unless scores is float [n] and mask bool [n] over this reallocator's units."""
        total = self.segments.total
        if scores.shape != (total,) or mask.shape != (total,):
            raise ValueError(
                f"scores and mask must both have shape ({total},), got {tuple(scores.shape)} and {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool, got {mask.dtype}")

    def adapt_and_split(self, k: np.ndarray, l: np.ndarray, free: np.ndarray, step: int) -> tuple[np.ndarray, bool]:
        """Steps 2 and 3 on the host, from the per-tensor counts k_i, l_i and free units: move H (this
        affects the next reallocation), then split K over the tensors. Returns (r_i int64 [tensors],
        whether the just-pruned units are eligible for regrowth: only at very high density, where the
        free ones do not suffice)."""
        total_pruned = int(k.sum())
        cfg = self.config
        if total_pruned > (1 + cfg.tolerance) * cfg.target_pruned:
            self.threshold /= 2
        elif total_pruned < (1 - cfg.tolerance) * cfg.target_pruned:
            self.threshold *= 2
        rng = np.random.default_rng([self.seed, int(step)])
        with_pruned = free.sum() < total_pruned
        return split_regrowth(l, free + k if with_pruned else free, total_pruned, rng), with_pruned

    def joined_segments(self, others: list["Reallocator"]) -> Segments:
        """This reallocator's segments followed by `others`', built on the device once per set of sizes
        (kept here, so they live as long as the reallocators)."""
        parts = [self.segments] + [r.segments for r in others]
        key = tuple(n for p in parts for n in p.sizes)
        if key not in self._joined:
            self._joined[key] = Segments.joined(parts)
        return self._joined[key]


class NonFiniteWeights(FloatingPointError):
    """A reallocation saw NaN or infinite scores; `trials` indexes the reallocators that did."""

    def __init__(self, message: str, trials: list[int]):
        super().__init__(message)
        self.trials = trials


def per_unit(reallocators: list[Reallocator], values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """One value per reallocator, repeated over its units and joined: [sum of units], made on the device."""
    return torch.cat([torch.full((r.segments.total,), v, dtype=dtype, device=device) for r, v in zip(reallocators, values)])


def reallocate_together(reallocators: list[Reallocator], scores: list[torch.Tensor], masks: list[torch.Tensor],
                        step: int) -> list[ReallocationResult]:
    """Algorithm 1 for several independent sets of tensors at once (the trials of one process):
    each result is exactly what that reallocator's own `reallocate` gives (its threshold, counts and
    random draws), with one host sync and one sort pair for all of them.

    scores[t]: float [n_t]; masks[t]: bool [n_t] (see Reallocator.reallocate). On non-finite scores
    nothing changes and NonFiniteWeights names the trials. A single reallocator is the common case:
    it runs on its own tensors and segments, without joining copies.
    """
    for r, sc, m in zip(reallocators, scores, masks, strict=True):
        r.check_inputs(sc, m)
    one = len(reallocators) == 1
    device = scores[0].device
    if one:
        seg, score, mask, threshold = reallocators[0].segments, scores[0], masks[0], reallocators[0].threshold
    else:  # each unit compared with its own trial's H, in the scores' dtype (as a Python float is compared)
        seg, score, mask = reallocators[0].joined_segments(reallocators[1:]), torch.cat(scores), torch.cat(masks)
        threshold = per_unit(reallocators, [r.threshold for r in reallocators], score.dtype, device)
    thresholds_used = [r.threshold for r in reallocators]

    # 1. Prune below H; keep the strongest unit of any tensor that would be emptied.
    survived = mask & (score >= threshold)
    kept, active = seg.count(torch.stack([survived, mask]))
    emptied = (kept == 0) & (active > 0)
    survived |= seg.first_largest(score, mask) & emptied[seg.ids]
    pruned = mask & ~survived

    # The one host sync: per-tensor pruned, surviving, free and non-finite counts (4 x tensors ints).
    counts = seg.count(torch.stack([pruned, survived, ~mask, ~torch.isfinite(score)])).cpu().numpy()
    per_trial = np.split(counts, np.cumsum([len(r.segments) for r in reallocators])[:-1], axis=1)  # [4, tensors]
    bad = [t for t, c in enumerate(per_trial) if c[3].any()]
    if bad:
        tensors = {t: np.flatnonzero(per_trial[t][3]).tolist() for t in bad}
        raise NonFiniteWeights(f"non-finite (NaN or infinite) weights in sparse tensors {tensors[0] if one else tensors}: "
                               "training diverged, refusing to reallocate", bad)

    # 2. and 3. on the host (H, the integer split of K), then one random draw per trial, one selection for all.
    splits = [r.adapt_and_split(k, l, free, step) for r, (k, l, free, _) in zip(reallocators, per_trial)]
    regrow_counts = [counts_i for counts_i, _ in splits]
    with_pruned = [flag for _, flag in splits]
    eligible = ~mask
    if any(with_pruned):
        eligible = torch.where(per_unit(reallocators, with_pruned, torch.bool, device), ~survived, eligible)
    keys = [torch.rand(r.segments.total, generator=seeded_generator(device, r.seed, step), device=device)
            for r in reallocators]  # each trial's own draw, as if alone
    keys = (keys[0] if one else torch.cat(keys)).masked_fill(~eligible, float("inf"))
    regrown = seg.select_smallest(keys, torch.as_tensor(np.concatenate(regrow_counts), device=device))

    sizes = [r.segments.total for r in reallocators]
    return [ReallocationResult(s, g, c[0], counts_i, c[1] + counts_i, used, r.threshold)
            for s, g, c, counts_i, used, r in zip(survived.split(sizes), regrown.split(sizes), per_trial, regrow_counts,
                                                    thresholds_used, reallocators)]
