"""Element-mode sparse parameters: dense weight tensors with boolean masks.

This is the reference granularity that reproduces the paper. The invariant kept here is that a
masked weight is exactly zero at every point the model can see it:

- gradients are masked before the optimizer step, so weight decay and momentum never move a
  pruned weight (its decay term is wd * 0 = 0 and its momentum buffer is zeroed when pruned);
- weights are re-masked after every step, which also covers `keep_momentum`, where the stale
  buffer of a pruned weight is kept (as the DSR authors' code did) and may be non-zero;
- on a reallocation, pruned weights are zeroed and regrown ones start at zero, with zero
  optimizer state (unless `keep_momentum`).
"""

from __future__ import annotations

import torch
from torch import nn

from .reallocator import Reallocator, ReallocationResult
from .select import Segments, seeded_generator


def initial_keep_count(numel: int, sparsity: float) -> int:
    """Weights a tensor keeps at the start: int((1 - s) * numel + 0.1), at least one."""
    return max(1, int((1 - sparsity) * numel + 0.1))


class ElementSparsity:
    """Masks over a fixed, ordered set of parameters.

    params: name -> Parameter (any shape); masks: name -> bool tensor of the same shape.
    """

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]):
        if list(params) != list(masks):
            raise ValueError(f"params and masks must have the same names in the same order: {list(params)} vs {list(masks)}")
        for name, p in params.items():
            m = masks[name]
            if m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"mask of {name} must be bool {tuple(p.shape)}, got {m.dtype} {tuple(m.shape)}")
        self.names = list(params)
        self.params = list(params.values())
        self.masks = [masks[n].to(p.device) for n, p in zip(self.names, self.params)]
        self.segments = Segments([p.numel() for p in self.params], self.params[0].device)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, params: dict[str, nn.Parameter], sparsity: float, seed: int) -> "ElementSparsity":
        """A uniformly random structure: each tensor keeps initial_keep_count(numel, sparsity)."""
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        tensors = list(params.values())
        segments = Segments([p.numel() for p in tensors], tensors[0].device)
        counts = torch.tensor([initial_keep_count(p.numel(), sparsity) for p in tensors], device=tensors[0].device)
        eligible = torch.ones(segments.total, dtype=torch.bool, device=tensors[0].device)
        flat = segments.select_random(eligible, counts, seeded_generator(tensors[0].device, seed, -1))
        masks = {n: m.view_as(p) for (n, p), m in zip(params.items(), segments.split(flat))}
        return cls(params, masks)

    # ---- the masking invariant ----------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight (in place)."""
        torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradient of every masked weight (in place); call before optimizer.step()."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, [m for p, m in zip(self.params, self.masks) if p.grad is not None])

    # ---- flat views used by the reallocator -----------------------------------------------
    def flat_mask(self) -> torch.Tensor:
        """bool [n]: all masks end to end."""
        return torch.cat([m.reshape(-1) for m in self.masks])

    @torch.no_grad()
    def flat_scores(self) -> torch.Tensor:
        """float [n]: |w| of every weight end to end."""
        return torch.cat([p.detach().reshape(-1).abs().float() for p in self.params])

    @torch.no_grad()
    def set_structure(self, survived: torch.Tensor, regrown: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None, keep_momentum: bool = False) -> None:
        """Install a new structure given flat bool [n] masks of surviving and regrown weights.

        Pruned and regrown weights become exactly zero. Optimizer state tensors shaped like a
        parameter are multiplied by `survived`, so pruned and regrown weights restart with zero
        state, unless keep_momentum.
        """
        survived_t = [m.view_as(p) for m, p in zip(self.segments.split(survived), self.params)]
        new = [m.view_as(p) for m, p in zip(self.segments.split(survived | regrown), self.params)]
        torch._foreach_mul_(self.params, survived_t)
        if optimizer is not None and not keep_momentum:
            for p, keep in zip(self.params, survived_t):
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.mul_(keep)
        self.masks = new

    def reallocate(self, reallocator: Reallocator, step: int, optimizer: torch.optim.Optimizer | None = None,
                   keep_momentum: bool = False) -> ReallocationResult:
        """Run one DPR reallocation on these tensors and install its result."""
        result = reallocator.reallocate(self.flat_scores(), self.flat_mask(), step)
        self.set_structure(result.survived, result.regrown, optimizer, keep_momentum)
        return result

    @torch.no_grad()
    def prune_to(self, keep_counts: list[int]) -> None:
        """Magnitude pruning: each tensor keeps its keep_counts[i] largest |w| among active weights."""
        scores = torch.where(self.flat_mask(), -self.flat_scores(), torch.tensor(float("inf"), device=self.params[0].device))
        keep = self.segments.select_smallest(scores, torch.tensor(keep_counts, device=scores.device))
        self.set_structure(keep, torch.zeros_like(keep))

    # ---- reporting and persistence --------------------------------------------------------
    def nonzero_counts(self) -> list[int]:
        """Active weights per tensor (one host sync)."""
        return self.segments.count(self.flat_mask()).tolist()

    def densities(self) -> dict[str, float]:
        return {n: c / p.numel() for n, c, p in zip(self.names, self.nonzero_counts(), self.params)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu() for n, m in zip(self.names, self.masks)}

    def load_state_dict(self, masks: dict[str, torch.Tensor]) -> None:
        if list(masks) != self.names:
            raise ValueError(f"mask names do not match the model's sparse tensors: {list(masks)} vs {self.names}")
        for n, m, p in zip(self.names, masks.values(), self.params):
            if m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"mask of {n} must be bool {tuple(p.shape)}, got {m.dtype} {tuple(m.shape)}")
        self.masks = [m.to(p.device) for m, p in zip(masks.values(), self.params)]
