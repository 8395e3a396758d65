"""Block layout of a block-sparse weight matrix, and packed <-> dense conversion.

A weight matrix ``W`` of shape ``[N, K]`` is cut into ``(bn, bk)`` blocks, giving a
block grid of ``[N // bn, K // bk]``. A boolean block mask over that grid says which
blocks are stored. The stored ("packed") values are a tensor ``[nnz, bn, bk]`` in
row-major block order: sorted by block row, then block column.

The layout only holds index tensors (int32, on the weight's device). Kernels read
them as data, so rebuilding a layout with a new mask never recompiles a kernel.
"""
from __future__ import annotations

import torch

from .reference import dense_weight, gather_blocks

__all__ = ["BlockLayout", "from_dense", "to_dense"]


class BlockLayout:
    """Index tensors describing which ``(bn, bk)`` blocks of an ``[N, K]`` matrix are stored.

    Args:
        mask: bool tensor ``[N // bn, K // bk]``, True where a block is stored.
        block: ``(bn, bk)`` block shape.

    Attributes (all index tensors are int32, on ``mask.device``):
        shape: ``(N, K)`` of the dense matrix.
        block: ``(bn, bk)``.
        grid: ``(N // bn, K // bk)``, the block grid.
        nnz: number of stored blocks (a Python int).
        mask: the bool block mask ``[N // bn, K // bk]``.
        row_ptr: ``[N // bn + 1]``; blocks of block row ``n`` are packed blocks
            ``row_ptr[n] .. row_ptr[n + 1] - 1``.
        col_idx: ``[nnz]``, block column of each packed block.
        row_idx: ``[nnz]``, block row of each packed block.
        col_ptr: ``[K // bk + 1]``; column ``k`` holds entries ``col_ptr[k] .. col_ptr[k + 1] - 1``
            of the column-compressed view.
        col_row_idx: ``[nnz]``, block row of each entry of the column view (rows ascending
            within a column).
        col_perm: ``[nnz]``, index of each column-view entry into the packed values.
    """

    def __init__(self, mask: torch.Tensor, block: tuple[int, int]):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask: expected a 2-D bool tensor, got {_describe(mask)}")
        bn, bk = (int(b) for b in block)
        if bn <= 0 or bk <= 0:
            raise ValueError(f"block: expected two positive ints, got {tuple(block)}")
        nb, kb = mask.shape
        self.block = (bn, bk)
        self.grid = (nb, kb)
        self.shape = (nb * bn, kb * bk)
        self.mask = mask
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order; the one host sync
        self.nnz = int(rows.numel())
        self.row_idx = rows.to(torch.int32)
        self.col_idx = cols.to(torch.int32)
        self.row_ptr = _ptr(rows, nb)
        order = torch.argsort(cols * nb + rows)
        self.col_perm = order.to(torch.int32)
        self.col_row_idx = self.row_idx[order]
        self.col_ptr = _ptr(cols, kb)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block: tuple[int, int]) -> "BlockLayout":
        """Layout of the blocks of ``dense`` ``[N, K]`` that hold any nonzero."""
        bn, bk = block
        _check_divides(dense.shape, block, "dense")
        nb, kb = dense.shape[0] // bn, dense.shape[1] // bk
        mask = dense.reshape(nb, bn, kb, bk).ne(0).any(dim=3).any(dim=1)
        return cls(mask, block)

    @classmethod
    def random(cls, shape: tuple[int, int], block: tuple[int, int], density: float,
               device=None, generator: torch.Generator | None = None) -> "BlockLayout":
        """A layout keeping each block independently with probability ``density``."""
        _check_divides(shape, block, "shape")
        grid = (shape[0] // block[0], shape[1] // block[1])
        mask = torch.rand(grid, generator=generator) < density
        return cls(mask.to(device), block)

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def to(self, device) -> "BlockLayout":
        """The same layout with its index tensors on ``device``."""
        return BlockLayout(self.mask.to(device), self.block)

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """Packed values ``[nnz, bn, bk]`` of the active blocks of ``dense`` ``[N, K]``."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"dense: expected shape {self.shape}, got {tuple(dense.shape)}")
        if dense.device != self.device:
            raise ValueError(f"dense: expected device {self.device}, got {dense.device}")
        return gather_blocks(dense, self.row_idx, self.col_idx, self.block)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, K]`` matrix with ``values`` ``[nnz, bn, bk]`` scattered in, zeros elsewhere."""
        self.check_values(values)
        return dense_weight(values, self.row_idx, self.col_idx, self.grid)

    def check_values(self, values: torch.Tensor, name: str = "values") -> None:
        """Raise if ``values`` is not a ``[nnz, bn, bk]`` tensor on this layout's device."""
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(values).__name__}")
        expected = (self.row_idx.shape[0], *self.block)
        if tuple(values.shape) != expected:
            raise ValueError(f"{name}: expected packed shape [nnz, bn, bk] = {list(expected)} "
                             f"for this layout, got {list(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the layout's), got {values.device}")

    def __repr__(self) -> str:
        return (f"BlockLayout(shape={self.shape}, block={self.block}, nnz={self.nnz}, "
                f"density={self.nnz / max(1, self.grid[0] * self.grid[1]):.3f}, device={self.device})")


def _ptr(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Compressed pointer ``[n + 1]`` (int32) for group ids ``idx`` in ``[0, n)``.

    (index_add rather than bincount, which syncs with the host on CUDA.)
    """
    counts = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, idx + 1, torch.ones_like(idx))
    return counts.cumsum(0).to(torch.int32)


def _check_divides(shape, block, name):
    if len(shape) != 2 or shape[0] % block[0] or shape[1] % block[1]:
        raise ValueError(f"{name}: expected a 2-D shape divisible by block {tuple(block)}, got {tuple(shape)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dim()}-D {x.dtype} tensor"
    return type(x).__name__


def from_dense(dense: torch.Tensor, block: tuple[int, int], layout: BlockLayout | None = None):
    """Pack ``dense`` ``[N, K]``: returns ``(values [nnz, bn, bk], layout)``.

    Without ``layout``, every block holding a nonzero is kept.
    """
    if layout is None:
        layout = BlockLayout.from_dense(dense, block)
    elif layout.block != tuple(block):
        raise ValueError(f"block: expected {layout.block} (the layout's), got {tuple(block)}")
    return layout.pack(dense), layout


def to_dense(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Dense ``[N, K]`` matrix from packed ``values`` ``[nnz, bn, bk]``."""
    return layout.unpack(values)
