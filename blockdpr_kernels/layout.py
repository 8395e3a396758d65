"""Block layout of a block-sparse weight matrix, and packed <-> dense conversion.

A weight matrix ``W`` of shape ``[N, K]`` is cut into ``(bn, bk)`` blocks, giving a
block grid of ``[N // bn, K // bk]``. A boolean block mask over that grid says which
blocks are stored. The stored ("packed") values are a tensor ``[nnz, bn, bk]`` in
row-major block order: sorted by block row, then block column.

The layout holds index tensors (int32, on the weight's device) and the rest of the kernels'
launch metadata (weight-gradient runs and their counters), all built once per layout; the fp32
reduction workspace of the weight gradient is one buffer per device shared by every layout
(:func:`wgrad_workspace`), sized when a layout is built. Kernels read them as data, so rebuilding a layout with a new mask never recompiles
a kernel.
"""
from __future__ import annotations

import functools
import math

import torch

from .reference import dense_weight, gather_blocks

__all__ = ["BlockLayout", "from_dense", "to_dense", "wgrad_group", "wgrad_runs_bound", "wgrad_splits",
           "wgrad_workspace", "density_bucket"]


class BlockLayout:
    """Index tensors describing which ``(bn, bk)`` blocks of an ``[N, K]`` matrix are stored,
    and every piece of launch metadata the kernels need, built once per layout (once per
    reallocation) so that a kernel call does no host-side work beyond its launch.

    Args:
        mask: bool tensor ``[N // bn, K // bk]``, True where a block is stored.
        block: ``(bn, bk)`` block shape.

    Attributes (all index tensors are int32, on ``mask.device``):
        shape: ``(N, K)`` of the dense matrix.
        block: ``(bn, bk)``.
        grid: ``(N // bn, K // bk)``, the block grid.
        nnz: number of stored blocks (a Python int).
        mask: a copy of the bool block mask ``[N // bn, K // bk]`` (a new tensor at every read:
            editing it cannot desynchronise the index tensors; build a new layout from the edited copy).
        row_ptr: ``[N // bn + 1]``; blocks of block row ``n`` are packed blocks
            ``row_ptr[n] .. row_ptr[n + 1] - 1``.
        col_idx: ``[nnz]``, block column of each packed block.
        row_prefix: ``[N // bn, K // bk + 1]``; the packed blocks of block row ``n`` in block columns
            ``c0 .. c1 - 1`` are ``row_prefix[n, c0] .. row_prefix[n, c1] - 1`` (so ``row_prefix[:, 0]``
            and ``row_prefix[:, -1]`` are ``row_ptr[:-1]`` and ``row_ptr[1:]``); the conv forward reads
            one kernel tap's blocks of a row (a range of columns) from it.
        row_idx: ``[nnz]``, block row of each packed block.
        col_ptr: ``[K // bk + 1]``; column ``k`` holds entries ``col_ptr[k] .. col_ptr[k + 1] - 1``
            of the column-compressed view.
        col_row_idx: ``[nnz]``, block row of each entry of the column view (rows ascending
            within a column).
        col_perm: ``[nnz]``, index of each column-view entry into the packed values.
        wgrad_groups: ``[n_groups, 2]``, first and end packed block of each run of up to
            :func:`wgrad_group` ``(bk)`` blocks of one block row (one weight-gradient program each).
            ``n_groups = nnz // g + N // bn + 1`` is a bound that depends on ``nnz`` only, so layouts with
            the same ``nnz`` have the same shapes, and is at least 2, so torch.compile's 0/1 size
            specialisation never recompiles at a reallocation; the unused rows are empty runs ``(0, 0)``.
        wgrad_counters: int32 ``[n_groups]`` zeros: split programs done per group (reset the same way).
        wgrad_splits: M splits of the weight gradient (an int property, :func:`wgrad_splits`): 1 when
            the groups alone give about four programs per SM of the layout's device, more otherwise.
        density_bucket: ``ceil(log2(nnz / (N // bn) + 1))`` (an int property, :func:`density_bucket`),
            the coarse count of active blocks per block row in the kernels' autotune key.
        storage, offset: ``None`` and 0, unless a :class:`~blockdpr_kernels.PackedStorage` holds this
            layout's blocks in its rows ``offset .. offset + nnz - 1`` (then the packed indices above are
            rows of the storage, the per-block tensors are the storage's ``[total]`` ones, and
            ``local_rows``, ``local_row_idx``, ``local_col_idx`` ``[nnz]`` describe the layout's own blocks).

    The two ints are functions of the tensor sizes and the device, which the launchers recompute in
    O(1) Python (the SM count is queried once per device): torch.compile guards int attributes of a
    module as constants, so storing them would recompile the model at every reallocation, while
    sizes become dynamic. One layout's weight gradients must not run concurrently on two streams
    (they share the counters), and weight gradients of layouts on one device must not run concurrently
    on two streams (they share :func:`wgrad_workspace`).
    """

    def __init__(self, mask: torch.Tensor, block: tuple[int, int], nnz: int | None = None):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask: expected a 2-D bool tensor, got {_describe(mask)}")
        bn, bk = (int(b) for b in block)
        if bn <= 0 or bk <= 0:
            raise ValueError(f"block: expected two positive ints, got {tuple(block)}")
        nb, kb = mask.shape
        self.block = (bn, bk)
        self.grid = (nb, kb)
        self.shape = (nb * bn, kb * bk)
        # Built on the mask's device; reading the block count is the one sync (none when `nnz` is given,
        # which must then be the mask's count: a reallocation reads all layers' counts at once).
        self.nnz = int(mask.sum()) if nnz is None else int(nnz)
        self.offset = 0  # first packed row of this layout's blocks: 0 unless it shares a PackedStorage
        self.storage = None  # the PackedStorage whose values hold this layout's blocks, if any
        self._mask = mask.clone()
        for name, t in _index_tensors(mask, self.nnz, bk).items():
            setattr(self, name, t)
        wgrad_workspace(self.nnz * bn * bk, mask.device)  # grown here, at a reallocation, never in a call
        self.wgrad_counters = torch.zeros(self.wgrad_groups.shape[0], dtype=torch.int32, device=mask.device)

    @property
    def shared(self) -> bool:
        """Whether this layout's blocks are rows of a :class:`~blockdpr_kernels.PackedStorage` shared with
        other layouts (its packed indices are then rows of the storage's values)."""
        return self.storage is not None

    @torch.no_grad()
    def update_(self, mask: torch.Tensor) -> None:
        """Rewrite this layout in place for ``mask`` (bool ``[N // bn, K // bk]`` on the layout's device)
        holding the same number of blocks: every tensor keeps its storage and size (a captured CUDA
        graph or compiled call reading them stays valid) and ends equal to ``BlockLayout(mask, block)``'s.
        No host sync, no host copy. The caller guarantees the count (``mask.sum() == nnz``); a mask with
        another count gives a wrong layout (build a new one instead)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != self.grid:
            raise ValueError(f"mask: expected a bool tensor of the block grid {self.grid}, got {_describe(mask)} "
                             f"of shape {tuple(getattr(mask, 'shape', ()))}")
        if mask.device != self.device:
            raise ValueError(f"mask: expected device {self.device} (the layout's), got {mask.device}")
        if self.shared:
            raise ValueError("update_: this layout shares a PackedStorage; change it through PackedStorage.update_")
        self._mask.copy_(mask)
        for name, t in _index_tensors(mask, self.nnz, self.block[1]).items():
            getattr(self, name).copy_(t)
        self.wgrad_counters.zero_()

    @property
    def mask(self) -> torch.Tensor:
        return self._mask.clone()

    @property
    def wgrad_splits(self) -> int:
        return wgrad_splits(self.wgrad_groups.shape[0], self.device)

    @property
    def density_bucket(self) -> int:
        return density_bucket(self.nnz, self.grid[0])

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
        """A layout keeping exactly ``round(density * blocks)`` blocks, chosen uniformly at random.

        ``density`` in ``[0, 1]``; the draw is one ``torch.randperm`` of the block grid on the CPU, so a
        seeded ``generator`` (a CPU ``torch.Generator``) gives the same layout on every device.
        """
        _check_divides(shape, block, "shape")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density: expected a fraction of blocks kept in [0, 1], got {density}")
        grid = (shape[0] // block[0], shape[1] // block[1])
        blocks = grid[0] * grid[1]
        mask = torch.zeros(blocks, dtype=torch.bool)
        mask[torch.randperm(blocks, generator=generator)[: round(density * blocks)]] = True
        return cls(mask.view(grid).to(device), block)

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def to(self, device) -> "BlockLayout":
        """The same layout with its index tensors on ``device``."""
        if self.shared and torch.device(device) != self.device:
            raise ValueError("to: a layout sharing a PackedStorage moves with it: build the storage on the new device")
        return BlockLayout(self._mask.to(device), self.block)

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """Packed values ``[nnz, bn, bk]`` of the active blocks of ``dense`` ``[N, K]``."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"dense: expected shape {self.shape}, got {tuple(dense.shape)}")
        if dense.device != self.device:
            raise ValueError(f"dense: expected device {self.device}, got {dense.device}")
        return gather_blocks(dense, *self.local_index(), self.block)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, K]`` matrix with ``values`` ``[nnz, bn, bk]`` scattered in, zeros elsewhere."""
        self.check_values(values, rows=self.nnz)
        return dense_weight(values, *self.local_index(), self.grid)

    def local_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_idx, col_idx)`` of this layout's own blocks, int32 ``[nnz]`` each (the whole tensors unless
        the layout shares a PackedStorage)."""
        if not self.shared:
            return self.row_idx, self.col_idx
        return self.local_row_idx, self.local_col_idx

    def check_values(self, values: torch.Tensor, name: str = "values", rows: int | None = None) -> None:
        """Raise if ``values`` is not a ``[rows, bn, bk]`` tensor on this layout's device; ``rows``
        defaults to what the ops take: ``nnz``, or the storage's rows for a shared layout."""
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(values).__name__}")
        expected = (self.row_idx.shape[0] if rows is None else rows, *self.block)
        if tuple(values.shape) != expected:
            raise ValueError(f"{name}: expected packed shape [nnz, bn, bk] = {list(expected)} "
                             f"for this layout, got {list(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the layout's), got {values.device}")

    def __repr__(self) -> str:
        return (f"BlockLayout(shape={self.shape}, block={self.block}, nnz={self.nnz}, "
                f"density={self.nnz / max(1, self.grid[0] * self.grid[1]):.3f}, device={self.device})")


def _index_tensors(mask: torch.Tensor, nnz: int, bk: int, offset: int = 0,
                   n_groups: int | None = None) -> dict[str, torch.Tensor]:
    """The int32 index tensors of the layout of ``mask`` (bool ``[nb, kb]``, ``nnz`` True entries), built
    on the mask's device with no host sync (``nonzero_static`` takes the count instead of reading it).
    Packed indices (row_ptr, col_ptr, row_prefix, col_perm, wgrad_groups) start at ``offset``;
    ``wgrad_groups`` has ``n_groups`` rows (default: the bound of ``nnz``, see :class:`BlockLayout`)."""
    nb, kb = mask.shape
    as_int = functools.partial(torch.Tensor.to, dtype=torch.int32)
    flat = torch.nonzero_static(mask.reshape(-1), size=nnz).squeeze(1)  # row-major order
    rows, cols = flat // kb, flat % kb
    # Column view: (column, row) order, i.e. the row-major order of the transposed mask.
    by_col = torch.nonzero_static(mask.t().reshape(-1), size=nnz).squeeze(1)
    col_rows, col_cols = by_col % nb, by_col // nb
    index = torch.full((nb * kb,), -1, dtype=torch.int64, device=mask.device)
    index[flat] = torch.arange(nnz, device=mask.device)
    row_ptr = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0))
    col_ptr = torch.nn.functional.pad(mask.sum(0).cumsum(0), (1, 0))
    before = torch.nn.functional.pad(mask.to(torch.int64).cumsum(1), (1, 0))  # blocks left of each column
    runs = _runs(rows, row_ptr, wgrad_group(bk), nb, wgrad_runs_bound(nnz, nb, bk) if n_groups is None else n_groups)
    return {"row_idx": as_int(rows), "col_idx": as_int(cols), "row_ptr": as_int(row_ptr + offset),
            "col_ptr": as_int(col_ptr + offset), "row_prefix": as_int(before + row_ptr[:-1, None] + offset),
            "col_perm": as_int(index[col_cols + col_rows * kb] + offset), "col_row_idx": as_int(col_rows),
            "wgrad_groups": as_int(runs + offset)}


def wgrad_group(bk: int) -> int:
    """Blocks of one block row per weight-gradient program: enough for a dot with M = G * BK >= 64 (wgmma)."""
    return max(1, 64 // bk)


def wgrad_runs_bound(nnz: int, n_rows: int, bk: int) -> int:
    """A bound on the weight-gradient runs of ``nnz`` blocks in ``n_rows`` block rows (runs of up to
    :func:`wgrad_group` ``(bk)`` blocks of one row): the rows of a layout's ``wgrad_groups``, and what
    its split count follows."""
    return nnz // wgrad_group(bk) + n_rows + 1


def _runs(rows: torch.Tensor, row_ptr: torch.Tensor, g: int, n_rows: int, n_groups: int) -> torch.Tensor:
    """``[n_groups, 2]`` int64 (at least :func:`wgrad_runs_bound` rows): first and end packed
    block of each run of up to ``g`` consecutive blocks of one block row (``rows`` sorted, int64; ``row_ptr``
    ``[n_rows + 1]`` int64), then empty runs ``(0, 0)``. On the device, with no sync: each run's leading
    block scatters its run into slot (runs before it); other blocks scatter into a spare last slot that is dropped."""
    nnz = rows.numel()
    blk = torch.arange(nnz, device=rows.device)
    row_start, row_end = row_ptr[rows], row_ptr[rows + 1]
    lead = (blk - row_start) % g == 0
    slot = torch.where(lead, lead.cumsum(0) - 1, n_groups)
    out = torch.zeros(n_groups + 1, 2, dtype=torch.int64, device=rows.device)
    out[slot] = torch.stack([blk, torch.minimum(blk + g, row_end)], 1) * lead[:, None]
    return out[:n_groups]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (queried once per device); 2 elsewhere (the
    Triton interpreter on CPU: small, but enough to exercise the split path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def wgrad_workspace(numel: int, device: torch.device) -> torch.Tensor:
    """The fp32 zeros (at least ``numel`` elements) that split weight-gradient programs add into.

    One buffer per device, shared by every layout: each launch leaves it zero again, and launches on
    one stream run one after another, so the layers of a model take turns with it. Its size is the
    largest layout's ``nnz * bn * bk`` (not the sum over layers). Building a layout grows it (a new
    zeroed buffer) when that layout is larger than any before on its device, so a launch only looks it
    up; growing inside a CUDA graph capture, where the zeroing would only be recorded, is refused.
    """
    device = torch.device(device)
    buf = _WORKSPACES.get(device)
    if buf is None or buf.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("blockdpr_kernels: the weight-gradient workspace must grow during a CUDA graph "
                               "capture; build the layouts (or run one eager step) before capturing")
        buf = _WORKSPACES[device] = torch.zeros(max(numel, 1), dtype=torch.float32, device=device)
    return buf


def wgrad_splits(n_groups: int, device: torch.device) -> int:
    """M splits of the weight gradient: enough programs for about 4 per SM, 1 when the groups suffice."""
    if n_groups == 0:
        return 1
    return max(1, -(-4 * _sm_count(device) // n_groups))


def density_bucket(nnz: int, n_rows: int) -> int:
    """``ceil(log2(nnz / n_rows + 1))``: 0 for an empty layout, then one bucket per doubling of the
    active blocks per block row (dense 640x5760 in 32x32 blocks: 8; at 10%: 5)."""
    return math.ceil(math.log2(nnz / max(1, n_rows) + 1))


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
