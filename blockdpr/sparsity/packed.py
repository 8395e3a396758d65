"""Block mode: sparse convs and linears that store only their active blocks and run on blockdpr_kernels.

The layers are blockdpr_kernels.BlockSparseConv2d / BlockSparseLinear over one PackedStorage: a single
Parameter `values` [total, b_out, b_in] holding every layer's active blocks, layer after layer (its
gradient and optimizer state have the same packed shape; no dense copy of any weight exists), and each
layer's BlockLayout of its weight matrix ([C_out, kh * kw * C_in] for a conv, [out, in] for a linear)
over its rows. BlockSparsity is the storage the reallocator works on. DPR, SET and RigL conserve the
total number of active blocks, so a reallocation moves blocks between rows in place: one gather of the
values and of each optimizer state tensor into the new order (survivors keep theirs, regrown blocks
start at zero with zero state) and the layouts rewritten on the device (`PackedStorage.update_`); no
Parameter or tensor changes shape, so a captured step stays valid for the whole run. Only a new total
(gradual pruning, loading another structure) gives the storage a new Parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from blockdpr_kernels import CONV_BLOCKS, LINEAR_BLOCKS, BlockLayout, BlockSparseConv2d, BlockSparseLinear, PackedStorage

from .blocks import block_grid, block_means, weight_to_matrix
from .distribution import densities
from .select import Segments
from .structure import SparseStructure, random_structure


class BlockSparsity(SparseStructure):
    """The packed block-sparse layers of a model, as one set of reallocation units (blocks), over one
    PackedStorage built here from the layers (which then share it)."""

    def __init__(self, layers: dict[str, BlockSparseConv2d | BlockSparseLinear]):
        if not layers:
            raise ValueError("BlockSparsity needs at least one layer")
        self.names = list(layers)
        self.layers = list(layers.values())
        self.block = self.layers[0].block
        self.storage = PackedStorage(self.layers)
        self.segments = Segments([m.layout.grid[0] * m.layout.grid[1] for m in self.layers], self.storage.device)
        self.dense_numels = [torch.Size(m.weight_shape).numel() for m in self.layers]
        self.params_replaced = False  # by the last set_structure

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.storage.values]

    def split_rows(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of a tensor of the storage's shape (values, their gradient, an optimizer state) per layer:
        ``[nnz_i, b_out, b_in]`` each, in layer order."""
        return packed.split(self.storage.counts)

    def apply_(self) -> None:
        """Nothing to mask: packed storage holds only active blocks."""

    def mask_grads_(self) -> None:
        """Nothing to mask: gradients have the packed shape."""

    def flat_mask(self) -> torch.Tensor:
        return torch.cat([m.layout.mask.reshape(-1) for m in self.layers])

    @torch.no_grad()
    def flat_scores(self) -> torch.Tensor:
        """Mean |w| of every block (0 where inactive): the storage's rows scattered to their grid positions
        (storage order is the flat order of the active blocks)."""
        mask = self.flat_mask()
        scores = torch.zeros(mask.numel(), device=mask.device)
        scores[mask] = self.storage.values.detach().abs().float().mean(dim=(1, 2))
        return scores

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
                      optimizer: torch.optim.Optimizer | None = None, keep_momentum: bool = False,
                      counts: list[int] | None = None) -> None:
        """Install the new masks: survivors keep their values and optimizer state, regrown blocks start
        at zero with zero state, pruned blocks are dropped (keep_momentum has no effect here).

        All layers' new block counts come to the host in one read (none when `counts` gives them). The rows
        of the storage are gathered into the new order in one step for all layers (values, and every
        optimizer state tensor of the values' shape, with `copy_`), the gradient (in the old order) is
        zeroed, and the layouts are rewritten on the device. With the same total (always under dsr, set
        and rigl) nothing changes shape or identity; a new total gets a new Parameter (the optimizer is
        updated to hold it). `params_replaced` records whether this call replaced it (the engine
        recaptures its graphs only then).
        """
        new = survived | regrown
        counts = self.segments.count(new).tolist() if counts is None else [int(c) for c in counts]
        old_mask = self.flat_mask()
        # Row of every grid position in the old storage (-1: inactive or pruned): storage order is the flat
        # order of the active blocks, so it is the count of active blocks before the position.
        old_row = torch.where(survived & old_mask, old_mask.cumsum(0) - 1, -1)
        source = old_row[torch.nonzero_static(new, size=sum(counts)).squeeze(1)]
        masks = [m.view(layer.layout.grid) for m, layer in zip(self.segments.split(new), self.layers)]
        values = self.storage.values
        self.params_replaced = sum(counts) != self.storage.total
        if self.params_replaced:
            self.storage.replace_values_(_gather_blocks(values.detach(), source), masks, counts)
            if optimizer is not None:
                _replace_in_optimizer(optimizer, values, self.storage.values, lambda t: _gather_blocks(t, source))
            return
        values.copy_(_gather_blocks(values.detach(), source))
        if values.grad is not None:  # in the old order
            values.grad.zero_()
        state = optimizer.state.get(values, {}) if optimizer is not None else {}
        for v in state.values():
            if torch.is_tensor(v) and v.shape == values.shape:
                v.copy_(_gather_blocks(v, source))
        self.storage.update_(masks, counts)

    def nonzero_counts(self) -> list[int]:
        return [m.layout.nnz * m.block[0] * m.block[1] for m in self.layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Block masks [grid] per layer (the values are in the model's state_dict)."""
        return {n: m.layout.mask.cpu() for n, m in zip(self.names, self.layers)}

    def load_state_dict(self, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install saved block masks with zero values (the same Parameter when the total is the same, its
        optimizer state dropped; else a new one, which `optimizer` is told of, with empty state); load the
        model's state_dict (and the optimizer's) to fill them."""
        if list(masks) != self.names:
            raise ValueError(f"block mask names do not match the model's block-sparse layers: {list(masks)} vs {self.names}")
        for n, m in zip(self.names, self.layers):
            mask = masks[n]
            if mask.shape != m.layout.mask.shape or mask.dtype != torch.bool:
                raise ValueError(f"block mask of {n} must be bool {tuple(m.layout.mask.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        old = self.storage.values
        replaced = self.storage.load_([masks[n].to(self.storage.device) for n in self.names])
        if optimizer is not None:
            if replaced:
                _replace_in_optimizer(optimizer, old, self.storage.values, None)
            else:
                optimizer.state.pop(old, None)


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
    the blocks of its dense weight that hold any non-zero (its layout follows the weight; layers sharing
    a PackedStorage install theirs together, a new total giving the storage a new Parameter: build the
    optimizer afterwards)."""
    state = dict(state)
    storages: dict[int, tuple] = {}  # id -> (storage, {layer: (layout, matrix)})
    for name, m in model.named_modules():
        if isinstance(m, BLOCK_SPARSE_LAYERS):
            weight = state.pop(f"{name}.weight", None)
            if weight is None or tuple(weight.shape) != m.weight_shape:
                found = None if weight is None else tuple(weight.shape)
                raise ValueError(f"dense state_dict needs {name}.weight of shape {m.weight_shape}, found {found}")
            matrix = weight_to_matrix(weight.to(m.values.device, m.values.dtype)).contiguous()
            layout = BlockLayout.from_dense(matrix, m.block)
            if m.layout.shared:
                storages.setdefault(id(m.layout.storage), (m.layout.storage, {}))[1][m] = (layout, matrix)
            else:
                m.set_layout(layout, layout.pack(matrix))
            state[f"{name}.values"] = layout.pack(matrix)
            state[f"{name}.block_mask"] = layout.mask
    for storage, found in storages.values():
        pairs = [found[m] for m in storage.layers]
        storage.load_([layout.mask for layout, _ in pairs], torch.cat([layout.pack(mat) for layout, mat in pairs]))
    model.load_state_dict(state)
