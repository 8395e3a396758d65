"""What every sparse storage shares: the initial structure, reallocation and magnitude pruning.

A storage (ElementSparsity: dense tensors with masks; BlockSparsity: packed active blocks)
exposes its units as flat vectors over all its tensors (`flat_scores`, `flat_mask`) and installs
a new structure from flat masks (`set_structure`); everything structural is written here once.
"""

from __future__ import annotations

import torch

from .reallocator import Reallocator, ReallocationResult, reallocate_together
from .select import Segments, seeded_generator


def initial_keep_count(units: int, sparsity: float) -> int:
    """Units a tensor keeps at the start: int((1 - s) * units + 0.1), at least one."""
    return max(1, int((1 - sparsity) * units + 0.1))


def keep_counts(sizes: list[int], sparsity: float, densities: list[float] | None = None) -> list[int]:
    """Units each tensor keeps at the start: initial_keep_count(size, sparsity) (uniform), or
    round(density * size) of a per-tensor density (blockdpr.sparsity.distribution), in [1, size]."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if densities is None:
        return [initial_keep_count(n, sparsity) for n in sizes]
    if len(densities) != len(sizes):
        raise ValueError(f"densities: expected one per tensor ({len(sizes)}), got {len(densities)}")
    return [min(n, max(1, round(d * n))) for n, d in zip(sizes, densities)]


def random_structure(segments: Segments, sparsity: float, seed: int, densities: list[float] | None = None
                     ) -> torch.Tensor:
    """Flat bool [n units]: each segment keeps keep_counts(sizes, sparsity, densities) units at random."""
    device = segments.device
    counts = torch.tensor(keep_counts(segments.sizes, sparsity, densities), device=device)
    eligible = torch.ones(segments.total, dtype=torch.bool, device=device)
    return segments.select_random(eligible, counts, seeded_generator(device, seed, -1))


def reallocate_structures(structures: list["SparseStructure"], reallocators: list[Reallocator], step: int,
                          optimizers: list, keep_momentum: bool = False) -> list[ReallocationResult]:
    """One DPR reallocation of several structures at once (the trials of one process, each with its
    own reallocator and optimizer view), each installed as if reallocated alone; one host sync in all
    (reallocator.reallocate_together). Raises NonFiniteWeights (nothing changed) on NaN or inf."""
    results = reallocate_together(reallocators, [s.flat_scores() for s in structures],
                                  [s.flat_mask() for s in structures], step)
    for structure, result, optimizer in zip(structures, results, optimizers, strict=True):
        structure.set_structure(result.survived, result.regrown, optimizer, keep_momentum,
                                counts=result.active_per_tensor.tolist())
    return results


class SparseStructure:
    """Base of the sparse storages. Subclasses set `names`, `segments` (units per tensor) and
    `dense_numels` (weights per tensor if dense), and implement the methods that raise here."""

    names: list[str]
    segments: Segments
    dense_numels: list[int]
    # True when the last set_structure replaced a Parameter (block mode, a layer's count changed):
    # captured graphs and optimizer references to the old one are stale. Element storage never does.
    params_replaced: bool = False

    # ---- implemented by each storage --------------------------------------------------------
    def flat_mask(self) -> torch.Tensor:
        """bool [n units]: which units are active, all tensors end to end."""
        raise NotImplementedError

    def flat_scores(self) -> torch.Tensor:
        """float [n units]: magnitude of every unit (|w| or mean |w| of a block); 0 if inactive."""
        raise NotImplementedError

    def flat_grad_scores(self, dense_grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """float [n units]: gradient magnitude of every unit, active or not (|dL/dw| or mean |g| of a
        block), RigL's growth score. Element storage reads the dense .grad (before masking); packed
        storage needs dense_grads, {name: dL/dW matrix [N, K]} (DenseGradCapture)."""
        raise NotImplementedError

    def set_structure(self, survived: torch.Tensor, regrown: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None, keep_momentum: bool = False,
                      counts: list[int] | None = None) -> None:
        """Install flat bool [n units] masks: survivors keep value and optimizer state, all
        others become zero with zero state (keep_momentum: state is left as it is, if kept). counts:
        the active units per tensor of the new masks when the host knows them (the reallocator does),
        which saves packed storage its read of them."""
        raise NotImplementedError

    def nonzero_counts(self) -> list[int]:
        """Active weights per tensor."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------
    def reallocate(self, reallocator: Reallocator, step: int, optimizer: torch.optim.Optimizer | None = None,
                   keep_momentum: bool = False) -> ReallocationResult:
        """Run one DPR reallocation on these tensors and install its result."""
        return reallocate_structures([self], [reallocator], step, [optimizer], keep_momentum)[0]

    @torch.no_grad()
    def prune_to_sparsity(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Magnitude pruning: each tensor keeps its initial_keep_count(units, sparsity) strongest
        active units (gradual magnitude pruning calls this with a rising sparsity)."""
        scores = self.flat_scores()
        keys = torch.where(self.flat_mask(), -scores, torch.full_like(scores, float("inf")))
        counts = torch.tensor([initial_keep_count(n, sparsity) for n in self.segments.sizes], device=keys.device)
        keep = self.segments.select_smallest(keys, counts)
        self.set_structure(keep, torch.zeros_like(keep), optimizer)

    def densities(self) -> dict[str, float]:
        """Fraction of active weights per tensor."""
        return {n: c / d for n, c, d in zip(self.names, self.nonzero_counts(), self.dense_numels)}
