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

__all__ = ["BlockLayout", "from_dense", "to_dense", "wgrad_group", "wgrad_splits", "wgrad_workspace",
           "density_bucket"]


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

    The two ints are functions of the tensor sizes and the device, which the launchers recompute in
    O(1) Python (the SM count is queried once per device): torch.compile guards int attributes of a
    module as constants, so storing them would recompile the model at every reallocation, while
    sizes become dynamic. One layout's weight gradients must not run concurrently on two streams
    (they share the counters), and weight gradients of layouts on one device must not run concurrently
    on two streams (they share :func:`wgrad_workspace`).
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
        self._mask = mask.clone()
        # Built on the host from one copy of the mask (the one sync), then copied to the device.
        host = mask.cpu()
        rows, cols = host.nonzero(as_tuple=True)  # row-major order
        self.nnz = int(rows.numel())
        order = torch.argsort(cols * nb + rows)
        groups = _runs(rows, wgrad_group(bk), nb)

        def dev(t):
            return t.to(device=mask.device, dtype=torch.int32)
        self.row_idx, self.col_idx = dev(rows), dev(cols)
        self.row_ptr, self.col_ptr = dev(_ptr(rows, nb)), dev(_ptr(cols, kb))
        before = torch.nn.functional.pad(host.to(torch.int64).cumsum(1), (1, 0))  # blocks left of each column
        self.row_prefix = dev(before + _ptr(rows, nb)[:-1, None])
        self.col_perm, self.col_row_idx = dev(order), dev(rows[order])
        self.wgrad_groups = dev(groups)
        wgrad_workspace(self.nnz * bn * bk, mask.device)  # grown here, at a reallocation, never in a call
        self.wgrad_counters = torch.zeros(groups.shape[0], dtype=torch.int32, device=mask.device)

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
        return BlockLayout(self._mask.to(device), self.block)

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
    """Compressed pointer ``[n + 1]`` (int64) for group ids ``idx`` (int64, host) in ``[0, n)``."""
    return torch.cat([idx.new_zeros(1), torch.bincount(idx, minlength=n).cumsum(0)])


def wgrad_group(bk: int) -> int:
    """Blocks of one block row per weight-gradient program: enough for a dot with M = G * BK >= 64 (wgmma)."""
    return max(1, 64 // bk)


def _runs(rows: torch.Tensor, g: int, n_rows: int) -> torch.Tensor:
    """``[nnz // g + n_rows + 1, 2]`` int64: first and end packed block of each run of up to ``g``
    consecutive blocks of one block row (``rows`` sorted, int64, host), then empty runs ``(0, 0)``."""
    nnz = rows.numel()
    blk = torch.arange(nnz)
    row_start = torch.searchsorted(rows, rows)
    row_end = torch.searchsorted(rows, rows, right=True)
    lead = (blk - row_start) % g == 0
    out = torch.zeros(nnz // g + n_rows + 1, 2, dtype=torch.int64)
    runs = torch.stack([blk[lead], torch.minimum(blk + g, row_end)[lead]], 1)
    out[: runs.shape[0]] = runs
    return out


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
