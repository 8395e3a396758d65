"""Element-mode sparse parameters: dense weight tensors with boolean masks.

This is the reference granularity that reproduces the paper. The invariant kept here is that a
masked weight is exactly zero at every point the model can see it:

- gradients are masked before the optimizer step, so weight decay and momentum never move a
  pruned weight (its decay term is wd * 0 = 0 and its momentum buffer is zeroed when pruned);
- weights are re-masked after every step, which also covers `keep_momentum`, where the stale
  buffer of a pruned weight is kept (as the DSR authors' code did) and may be non-zero;
- on a reallocation, pruned weights are zeroed and regrown ones start at zero, with zero
  optimizer state (unless `keep_momentum`).

The unit of reallocation is an element by default. With `block=(b_out, b_in)` it is a block of
the weight matrix (see blocks.py) scored by its mean |w|: the same masks, on dense storage, as
block mode's packed storage, which makes this the reference that block mode is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import block_grid, block_means, expand_blocks, matrix_to_weight, weight_to_matrix
from .select import Segments
from .structure import SparseStructure, random_structure


class ElementSparsity(SparseStructure):
    """Masks over a fixed, ordered set of parameters.

    params: name -> Parameter (any shape); masks: name -> bool tensor of the same shape.
    block: None (the unit is an element) or (b_out, b_in) (the unit is a block; masks must be
    made of whole blocks).
    """

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 block: tuple[int, int] | None = None):
        if list(params) != list(masks):
            raise ValueError(f"params and masks must have the same names in the same order: {list(params)} vs {list(masks)}")
        for name, p in params.items():
            m = masks[name]
            if m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"mask of {name} must be bool {tuple(p.shape)}, got {m.dtype} {tuple(m.shape)}")
        self.names = list(params)
        self.params = list(params.values())
        self.masks = [masks[n].to(p.device).clone() for n, p in zip(self.names, self.params)]  # owned: updated in place
        self.block = None if block is None else tuple(block)
        self.segments = Segments(unit_counts(self.params, self.block), self.params[0].device)
        self.dense_numels = [p.numel() for p in self.params]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def random(cls, params: dict[str, nn.Parameter], sparsity: float, seed: int,
               block: tuple[int, int] | None = None, densities: list[float] | None = None) -> "ElementSparsity":
        """A random structure: each tensor keeps initial_keep_count(units, sparsity) units (or its
        share of per-tensor `densities`, see structure.keep_counts) at random."""
        structure = cls(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}, block)
        keep = random_structure(structure.segments, sparsity, seed, densities)
        structure.set_structure(keep, torch.zeros_like(keep))
        return structure

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
        """bool [n units]: the masks of all units end to end."""
        if self.block is None:
            return torch.cat([m.reshape(-1) for m in self.masks])
        return torch.cat([weight_to_matrix(m)[:: self.block[0], :: self.block[1]].reshape(-1) for m in self.masks])

    @torch.no_grad()
    def flat_scores(self) -> torch.Tensor:
        """float [n units]: |w| of every element, or mean |w| of every block, end to end."""
        if self.block is None:
            return torch.cat([p.detach().reshape(-1) for p in self.params]).abs_().float()
        return torch.cat([block_means(weight_to_matrix(p), self.block).reshape(-1) for p in self.params])

    @torch.no_grad()
    def flat_grad_scores(self, dense_grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """float [n units]: |dL/dw| of every element (or mean |g| of every block) from the dense
        .grad, read before mask_grads_ zeroes the inactive ones."""
        if any(p.grad is None for p in self.params):
            raise RuntimeError("gradient scores need the gradient of every sparse weight: call after backward()")
        if self.block is None:
            return torch.cat([p.grad.reshape(-1) for p in self.params]).abs_().float()
        return torch.cat([block_means(weight_to_matrix(p.grad), self.block).reshape(-1) for p in self.params])

    def _element_masks(self, flat_units: torch.Tensor) -> list[torch.Tensor]:
        """Flat bool [n units] -> one element mask per parameter, shaped like it."""
        units = self.segments.split(flat_units)
        if self.block is None:
            return [u.view_as(p) for u, p in zip(units, self.params)]
        grids = [block_grid(p.shape, self.block) for p in self.params]
        return [matrix_to_weight(expand_blocks(u.view(g), self.block), p.shape) for u, g, p in zip(units, grids, self.params)]

    @torch.no_grad()
    def set_structure(self, survived: torch.Tensor, regrown: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None, keep_momentum: bool = False,
                      counts: list[int] | None = None) -> None:
        """Install a new structure given flat bool [n] masks of surviving and regrown weights.

        Pruned and regrown weights become exactly zero. Optimizer state tensors shaped like a
        parameter are multiplied by `survived`, so pruned and regrown weights restart with zero
        state, unless keep_momentum.
        """
        survived_t = self._element_masks(survived)
        new = self._element_masks(survived | regrown)
        torch._foreach_mul_(self.params, survived_t)
        if optimizer is not None and not keep_momentum:
            state, keep = [], []
            for p, survivors in zip(self.params, survived_t):
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        state.append(value)
                        keep.append(survivors)
            if state:
                torch._foreach_mul_(state, keep)
        torch._foreach_copy_(self.masks, new)  # in place: a captured CUDA graph keeps reading these tensors

    # ---- reporting and persistence --------------------------------------------------------
    def nonzero_counts(self) -> list[int]:
        """Active weights per tensor (one host sync)."""
        return torch.stack([m.sum() for m in self.masks]).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu().clone() for n, m in zip(self.names, self.masks)}

    def load_state_dict(self, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install saved masks in place (the parameters stay: `optimizer` needs no news)."""
        if list(masks) != self.names:
            raise ValueError(f"mask names do not match the model's sparse tensors: {list(masks)} vs {self.names}")
        for n, m, p in zip(self.names, masks.values(), self.params):
            if m.shape != p.shape or m.dtype != torch.bool:
                raise ValueError(f"mask of {n} must be bool {tuple(p.shape)}, got {m.dtype} {tuple(m.shape)}")
        torch._foreach_copy_(self.masks, [m.to(p.device) for m, p in zip(masks.values(), self.params)])


def unit_counts(params: list[torch.Tensor], block: tuple[int, int] | None) -> list[int]:
    """Units per tensor: elements, or blocks (with a clear error if a block does not tile a tensor)."""
    if block is None:
        return [p.numel() for p in params]
    counts = []
    for p in params:
        grid = block_grid(p.shape, block)
        if grid is None:
            raise ValueError(f"block {tuple(block)} does not tile a weight of shape {tuple(p.shape)}")
        counts.append(grid[0] * grid[1])
    return counts

