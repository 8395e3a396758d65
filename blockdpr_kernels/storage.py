"""One packed values tensor for several block-sparse layers, whose blocks can move between layers in place.

Dynamic sparse training that conserves the model's number of active blocks (DPR, SET, RigL) but not
each layer's can keep every tensor a training step reads at one size for the whole run:

* ``values`` ``[total, bn, bk]``: the active blocks of all layers, layer after layer, each layer's in
  row-major block order (layer ``i`` owns rows ``offset_i .. offset_i + nnz_i - 1``);
* the index tensors that have one entry per active block (``row_idx``, ``col_idx``, ``col_row_idx``,
  ``col_perm``; ``[total]`` each) are shared by the layers, and each layer's own index tensors
  (``row_ptr``, ``col_ptr``, ``row_prefix``, ``wgrad_groups``) have the size of its block grid and hold
  rows of ``values``, so the kernels read the shared tensors with no offset argument;
* :meth:`PackedStorage.update_` rewrites all of them in place for new masks with the same total, so a
  CUDA graph or compiled step captured once stays valid across reallocations (the reference backend
  reads per-layer copies of a layer's own indices instead, whose size follows its count).

    storage = PackedStorage([layer_a, layer_b])   # layers built by from_dense / sparsify_
    storage.update_([mask_a, mask_b], [nnz_a, nnz_b])  # new structure, same total; values: caller's job

The layers then pass ``storage.values`` to the ops, and their ``values`` attribute is the view of their own
rows. The weight gradient of a shared layout is a ``[total, bn, bk]`` tensor that is zero outside the
layer's rows (autograd sums the layers' into ``values.grad``). Moving values between rows at a
reallocation (survivors, zeros for new blocks, optimizer state alike) is the caller's: row ``j`` of the
new order is a block's row in the old order or new.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import BlockLayout, _index_tensors, wgrad_runs_bound, wgrad_workspace

__all__ = ["PackedStorage"]

_SHARED = ("row_idx", "col_idx", "col_row_idx", "col_perm")  # one entry per active block: [total]
_OWN = ("row_ptr", "col_ptr", "row_prefix", "wgrad_groups")  # the block grid's size: per layout


class PackedStorage:
    """The packed values of ``layers`` (BlockSparseConv2d / BlockSparseLinear of one block shape, dtype
    and device) as one Parameter ``values [total, bn, bk]``, and their layouts over it.

    Building it takes the layers' current values and structure (no host sync: the block counts are
    the layouts' ints) and makes each layer use it (``layer.values`` becomes a view of its rows; the
    Parameter is registered in every layer as ``packed``, which ``Module.parameters()`` lists once).
    """

    def __init__(self, layers: list[nn.Module]):
        if not layers:
            raise ValueError("PackedStorage: expected at least one layer")
        first = layers[0]
        for m in layers:
            if m.layout.shared:
                raise ValueError("PackedStorage: a layer already shares a PackedStorage")
            if m.block != first.block or m.values.dtype != first.values.dtype or m.values.device != first.values.device:
                raise ValueError(f"PackedStorage: layers must share block, dtype and device; got {m.block} "
                                 f"{m.values.dtype} {m.values.device} beside {first.block} {first.values.dtype} "
                                 f"{first.values.device}")
        self.layers = list(layers)
        self.block = first.block
        self.device = first.values.device
        counts = [m.layout.nnz for m in layers]
        masks = [m.layout.mask for m in layers]
        self.values = nn.Parameter(torch.cat([m.values.detach() for m in layers]).contiguous())
        self._build(masks, counts)

    @property
    def total(self) -> int:
        """Rows of ``values``: the active blocks of all layers."""
        return self.values.shape[0]

    @property
    def counts(self) -> list[int]:
        """Active blocks per layer (host ints, no sync)."""
        return [m.layout.nnz for m in self.layers]

    def _build(self, masks: list[torch.Tensor], counts: list[int]) -> None:
        """New shared tensors and layouts for ``masks`` (sum of counts = total), installed in the layers."""
        total, device, (bn, bk) = self.total, self.device, self.block
        if sum(counts) != total:
            raise ValueError(f"PackedStorage: the masks hold {sum(counts)} blocks, the values {total}")
        self.index = {name: torch.empty(total, dtype=torch.int32, device=device) for name in _SHARED}
        wgrad_workspace(total * bn * bk, device)  # shared rows: the split reduction indexes them all
        for m, mask, count, offset in zip(self.layers, masks, counts, _offsets(counts)):
            layout = BlockLayout.__new__(BlockLayout)
            nb, kb = mask.shape
            layout.block, layout.grid, layout.shape = (bn, bk), (nb, kb), (nb * bn, kb * bk)
            layout.nnz, layout.offset, layout.storage = count, offset, self
            layout._mask = mask.clone()
            tensors = _index_tensors(mask, count, bk, offset, _group_capacity(mask.shape, bk))
            for name in _OWN:
                setattr(layout, name, tensors[name])
            _set_local(layout, tensors, offset, count)
            for name in _SHARED:
                self.index[name].narrow(0, offset, count).copy_(tensors[name])
                setattr(layout, name, self.index[name])
            layout.wgrad_counters = torch.zeros(layout.wgrad_groups.shape[0], dtype=torch.int32, device=device)
            m._share(self.values, layout)

    @torch.no_grad()
    def update_(self, masks: list[torch.Tensor], counts: list[int]) -> None:
        """Rewrite every layout in place for ``masks`` (bool block grids, one per layer, on the storage's
        device) holding ``counts`` blocks (host ints, summing to ``total``): no tensor changes size or
        storage, no host sync. ``values`` is not touched: put each block's row in the new order first."""
        if len(masks) != len(self.layers) or len(counts) != len(self.layers):
            raise ValueError(f"update_: expected one mask and one count per layer ({len(self.layers)}), got "
                             f"{len(masks)} and {len(counts)}")
        if sum(counts) != self.total:
            raise ValueError(f"update_: the counts sum to {sum(counts)}, the storage holds {self.total} blocks "
                             "(a new total needs a new PackedStorage)")
        for m, mask, count, offset in zip(self.layers, masks, counts, _offsets(counts)):
            layout = m.layout
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != layout.grid:
                raise ValueError(f"update_: expected a bool mask of the block grid {layout.grid}, got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
            tensors = _index_tensors(mask, count, self.block[1], offset, layout.wgrad_groups.shape[0])
            for name in _OWN:
                getattr(layout, name).copy_(tensors[name])
            for name in _SHARED:
                self.index[name].narrow(0, offset, count).copy_(tensors[name])
            layout._mask.copy_(mask)
            layout.wgrad_counters.zero_()
            layout.nnz, layout.offset = count, offset
            _set_local(layout, tensors, offset, count)

    def load_(self, masks: list[torch.Tensor], values: torch.Tensor | None = None) -> bool:
        """Install ``masks`` (one host read of their counts) with ``values`` ``[blocks, bn, bk]`` in the new order
        (None: zeros). In place when the total is the same; else a new Parameter, and True is returned (an
        optimizer holding the old one must be told)."""
        counts = torch.stack([m.sum() for m in masks]).tolist()
        if values is None:
            values = self.values.new_zeros(sum(counts), *self.block)
        if sum(counts) != self.total:
            self.replace_values_(values, masks, counts)
            return True
        self.update_(masks, counts)
        with torch.no_grad():
            self.values.copy_(values)
        return False

    def replace_values_(self, values: torch.Tensor, masks: list[torch.Tensor], counts: list[int]) -> nn.Parameter:
        """A new total (e.g. gradual pruning): a new ``values`` Parameter ``[sum(counts), bn, bk]`` and new
        layouts for ``masks``; returns the Parameter (an optimizer holding the old one must be told)."""
        self.values = nn.Parameter(values.detach().to(self.values.dtype).contiguous())
        self._build(masks, counts)
        return self.values


def _set_local(layout: BlockLayout, tensors: dict, offset: int, count: int) -> None:
    """The layout's own blocks: their rows of ``values`` (int64 ``[nnz]``) and block rows / columns (int32
    ``[nnz]``); new tensors at every update (their size is the layer's count), read by the reference
    backend and pack / unpack; the kernels read only the size of ``local_row_idx`` (the layer's count, for
    the weight gradient's split count) and never the tensors, so a captured graph does not hold them."""
    layout.local_rows = torch.arange(offset, offset + count, device=layout.row_ptr.device)
    layout.local_row_idx, layout.local_col_idx = tensors["row_idx"], tensors["col_idx"]


def _offsets(counts: list[int]) -> list[int]:
    out, at = [], 0
    for c in counts:
        out.append(at)
        at += c
    return out


def _group_capacity(grid: tuple[int, int], bk: int) -> int:
    """Weight-gradient runs a layout of this grid can need at any density (every block active)."""
    return wgrad_runs_bound(grid[0] * grid[1], grid[0], bk)
