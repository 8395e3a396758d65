"""Block mode: sparse convs and linears that store only their active blocks and run on blockdpr_kernels.

The layers are blockdpr_kernels.BlockSparseConv2d / BlockSparseLinear: `values` [nnz, b_out, b_in]
(the only weight parameter; its gradient and optimizer state have the same packed shape) and a
BlockLayout of the weight matrix ([C_out, kh * kw * C_in] for a conv, [out, in] for a linear). No dense copy of the weight exists. BlockSparsity is the
storage the reallocator works on: a reallocation rewrites a layer's values, layout and optimizer
state in place when its block count is unchanged (`BlockLayout.update_`), else gives it a new
layout and values (`set_layout`) and the optimizer the matching state; survivors keep both,
regrown blocks start at zero with zero state.
"""

from __future__ import annotations

import torch
from torch import nn

from blockdpr_kernels import CONV_BLOCKS, LINEAR_BLOCKS, BlockLayout, BlockSparseConv2d, BlockSparseLinear

from .blocks import block_grid, block_means, weight_to_matrix
from .distribution import densities
from .select import Segments
from .structure import SparseStructure, random_structure


class BlockSparsity(SparseStructure):
    """The packed block-sparse layers of a model, as one set of reallocation units (blocks)."""

    def __init__(self, layers: dict[str, BlockSparseConv2d | BlockSparseLinear]):
        if not layers:
            raise ValueError("BlockSparsity needs at least one layer")
        self.names = list(layers)
        self.layers = list(layers.values())
        self.block = self.layers[0].block
        self.segments = Segments([m.layout.mask.numel() for m in self.layers], self.layers[0].values.device)
        self.dense_numels = [torch.Size(m.weight_shape).numel() for m in self.layers]
        self.params_replaced = False  # by the last set_structure

    @property
    def params(self) -> list[nn.Parameter]:
        return [m.values for m in self.layers]

    def apply_(self) -> None:
        """Nothing to mask: packed storage holds only active blocks."""

    def mask_grads_(self) -> None:
        """Nothing to mask: gradients have the packed shape."""

    def flat_mask(self) -> torch.Tensor:
        return torch.cat([m.layout.mask.reshape(-1) for m in self.layers])

    @torch.no_grad()
    def flat_scores(self) -> torch.Tensor:
        scores = []
        for m in self.layers:
            s = torch.zeros(m.layout.mask.numel(), device=m.values.device)
            s[m.layout.mask.reshape(-1)] = m.values.detach().abs().float().mean(dim=(1, 2))
            scores.append(s)
        return torch.cat(scores)

    @torch.no_grad()
    def flat_grad_scores(self, dense_grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """float [n blocks]: mean |g| of every block, active or not, from dense_grads {name: dL/dW
        matrix [N, K]} (DenseGradCapture: the packed gradient holds the active blocks only)."""
        if dense_grads is None or set(dense_grads) != set(self.names):
            raise ValueError("block mode: gradient scores need the dense weight gradient of every sparse layer "
                             "(DenseGradCapture around the step's forward and backward)")
        return torch.cat([block_means(dense_grads[n], m.block).reshape(-1) for n, m in zip(self.names, self.layers)])

    @torch.no_grad()
    def set_structure(self, survived: torch.Tensor, regrown: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None, keep_momentum: bool = False) -> None:
        """Install the new masks: survivors keep their values and optimizer state, regrown blocks start
        at zero with zero state, pruned blocks are dropped (keep_momentum has no effect here).

        All layers' new block counts come to the host in one read (the reallocation's one sync). A layer
        whose count is unchanged (always under set and rigl, which conserve each tensor's count) is
        rewritten in place: the same Parameter and state tensors (gathered with `copy_`) and its layout
        updated on the device (`BlockLayout.update_`), so a captured step stays valid. A layer whose count
        changed gets a new Parameter and layout (the optimizer is updated to hold it): torch.compile then
        sees a new input rather than a tensor whose shape changed under it. `params_replaced` records
        whether this call replaced any Parameter (the engine recaptures its graphs only then).
        """
        new_masks = self.segments.split(survived | regrown)
        counts = self.segments.count(survived | regrown).tolist()
        self.params_replaced = False
        for m, keep, new, count in zip(self.layers, self.segments.split(survived), new_masks, counts):
            grid = m.layout.grid
            # Packed index of every grid position in the old layout (-1: inactive or pruned): packed
            # order is row-major, so it is the count of active blocks before the position.
            old_mask = m.layout.mask.reshape(-1)
            old_index = torch.where(keep & old_mask, old_mask.cumsum(0) - 1, -1)
            source = old_index[torch.nonzero_static(new, size=count).squeeze(1)]  # new packed order: row-major
            old = m.values
            if count == m.layout.nnz:
                old.copy_(_gather_blocks(old.detach(), source))
                if old.grad is not None:  # in the old order: zero, as the rebuild's new Parameter has none
                    old.grad.zero_()
                state = optimizer.state.get(old, {}) if optimizer is not None else {}
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == old.shape:
                        v.copy_(_gather_blocks(v, source))
                m.layout.update_(new.view(grid))
                continue
            self.params_replaced = True
            m.set_layout(BlockLayout(new.view(grid), m.block, nnz=count), _gather_blocks(old.detach(), source))
            if optimizer is not None:
                _replace_in_optimizer(optimizer, old, m.values, lambda t: _gather_blocks(t, source))

    def nonzero_counts(self) -> list[int]:
        return [m.layout.nnz * m.block[0] * m.block[1] for m in self.layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Block masks [grid] per layer (the values are in the model's state_dict)."""
        return {n: m.layout.mask.cpu() for n, m in zip(self.names, self.layers)}

    def load_state_dict(self, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install saved block masks with zero values of the matching packed shape (new Parameters,
        which `optimizer` is told of, with empty state; else build the optimizer afterwards); load the
        model's state_dict (and the optimizer's) to fill them."""
        if list(masks) != self.names:
            raise ValueError(f"block mask names do not match the model's block-sparse layers: {list(masks)} vs {self.names}")
        for n, m in zip(self.names, self.layers):
            mask = masks[n]
            if mask.shape != m.layout.mask.shape or mask.dtype != torch.bool:
                raise ValueError(f"block mask of {n} must be bool {tuple(m.layout.mask.shape)}, got {mask.dtype} {tuple(mask.shape)}")
            layout = BlockLayout(mask.to(m.values.device), m.block)
            old = m.values
            m.set_layout(layout, m.values.new_zeros(layout.nnz, *m.block))
            if optimizer is not None:
                _replace_in_optimizer(optimizer, old, m.values, None)


def _replace_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, remap) -> None:
    """Make `optimizer` hold `new` where it held `old`; its state tensors shaped like `old` are
    carried over through `remap` (scalars such as Adam's step are kept as they are); remap None:
    the state is dropped."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, {})
    if remap is None:
        return
    optimizer.state[new] = {k: remap(v) if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()}


def _gather_blocks(values: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """values [nnz_old, ...] -> [len(source), ...]: row source[i] of values, or zeros where source[i] < 0."""
    out = values[source.clamp(min=0)]
    return out.masked_fill_((source < 0).view(-1, *([1] * (values.dim() - 1))), 0)


BLOCK_SPARSE_LAYERS = (BlockSparseConv2d, BlockSparseLinear)


def check_block(block: int, convs: bool) -> None:
    """ValueError in the library's words unless `block` is a size the kernels take (convs: CONV_BLOCKS)."""
    allowed = CONV_BLOCKS if convs else LINEAR_BLOCKS
    if block not in allowed:
        raise ValueError(f"block={block} must be one of {allowed}" + (" for convolutions" if convs else ""))


def to_block_sparse(model: nn.Module, names: list[str], block: int, sparsity: float, seed: int,
                    masks: dict[str, torch.Tensor] | None = None, distribution: str = "uniform"
                    ) -> tuple[BlockSparsity, list[str]]:
    """Replace the convs and linears `names` (weights, e.g. 'group1.0.conv1.weight') of `model` by
    BlockSparseConv2d / BlockSparseLinear with (block x block) blocks, in place.

    Structure: `masks` (name -> bool grid) if given, else random, each layer keeping
    initial_keep_count(blocks, sparsity) blocks (distribution "uniform") or its ERK share
    (distribution "erk", over the layers the block tiles; see sparsity/distribution.py). Layers whose channels the block does not divide
    stay dense; their names are returned as the second value so the caller can report them.
    """
    modules = dict(model.named_modules())
    layers_of = {n: modules[n.rsplit(".", 1)[0]] for n in names}
    check_block(block, any(isinstance(m, nn.Conv2d) for m in layers_of.values()))
    blockable = {n: c for n, c in layers_of.items() if block_grid(c.weight.shape, (block, block)) is not None}
    dense = [n for n in names if n not in blockable]
    if not blockable:
        raise ValueError(f"block={block} tiles none of the sparse layers ({len(names)} of them): choose a smaller block")
    grids = {n: block_grid(c.weight.shape, (block, block)) for n, c in blockable.items()}
    if masks is None:
        segments = Segments([g[0] * g[1] for g in grids.values()], next(model.parameters()).device)
        shares = None if distribution == "uniform" else densities(distribution, [tuple(blockable[n].weight.shape)
                                                                             for n in blockable], sparsity)
        flat = random_structure(segments, sparsity, seed, shares)
        masks = {n: m.view(grids[n]) for n, m in zip(blockable, segments.split(flat))}
    layers = {}
    for name, dense_layer in blockable.items():
        kind = BlockSparseConv2d if isinstance(dense_layer, nn.Conv2d) else BlockSparseLinear
        layer = kind.from_dense(dense_layer, block=(block, block), mask=masks[name].to(dense_layer.weight.device))
        parent_name, _, attr = name[: -len(".weight")].rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, layer)
        layers[name] = layer
    return BlockSparsity(layers), dense


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain dense state_dict: each block-sparse layer's `values` becomes its dense `weight`
    ([C_out, C_in, kh, kw] or [out, in]) with zeros where pruned. Loads into the dense model of the same shape."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, BLOCK_SPARSE_LAYERS):
            del state[f"{name}.values"], state[f"{name}.block_mask"]
            state[f"{name}.weight"] = m.to_dense()
    return state


def load_dense_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a plain dense state_dict into a model with block-sparse layers: each such layer keeps
    the blocks of its dense weight that hold any non-zero (its layout follows the weight).
    Layers get new Parameters: build the optimizer afterwards."""
    state = dict(state)
    for name, m in model.named_modules():
        if isinstance(m, BLOCK_SPARSE_LAYERS):
            weight = state.pop(f"{name}.weight", None)
            if weight is None or tuple(weight.shape) != m.weight_shape:
                found = None if weight is None else tuple(weight.shape)
                raise ValueError(f"dense state_dict needs {name}.weight of shape {m.weight_shape}, found {found}")
            matrix = weight_to_matrix(weight.to(m.values.device, m.values.dtype)).contiguous()
            layout = BlockLayout.from_dense(matrix, m.block)
            state[f"{name}.values"] = m.set_layout(layout, layout.pack(matrix)).detach()
            state[f"{name}.block_mask"] = layout.mask
    model.load_state_dict(state)
