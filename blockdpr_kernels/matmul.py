"""Block-sparse linear ``y = x @ W^T + b`` with ``W [N, K]`` packed as ``[nnz, bn, bk]`` (Triton).

A linear layer over ``M`` rows is a 1x1 conv over ``M`` pixels of a ``[M, 1, 1, K]`` NHWC
tensor, so these launchers reuse the implicit-GEMM kernels of :mod:`.conv` with unit
spatial size (Triton specialises the size-1 dims to constants, so the spatial index math
folds away):

* forward: dense x sparse -> dense, one program per (M tile, block row), looping over the
  row's active blocks (row_prefix / col_idx);
* input gradient: dense x sparse^T -> dense, one program per (M tile, block column),
  looping over the column's active blocks (col_ptr / col_row_idx / col_perm);
* weight gradient: sampled dense x dense -> packed, active blocks only.

All tensors are contiguous and on one device; ``x`` and ``values`` share a dtype.
"""
from __future__ import annotations

import torch

from . import conv

_ONE = ((1, 1), 1, 0)  # kernel size, stride, padding of the equivalent conv


def _tf32(t: torch.Tensor) -> bool:
    """Whether TF32 is allowed for ``t``'s matmul (torch's flag is read only for fp32: it costs ~1 us)."""
    return t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def forward(x, values, row_prefix, col_idx, bias, n_out: int) -> torch.Tensor:
    """``x [M, K]`` -> ``y [M, N]`` (dtype of x)."""
    m, k = x.shape
    y = x.new_empty(m, n_out)
    conv.forward(x, values, row_prefix, col_idx, bias, y, (m, 1, 1, k), (m, 1, 1, n_out), *_ONE, _tf32(x))
    return y


def grad_input(dy, values, col_ptr, col_row_idx, col_perm, k_in: int) -> torch.Tensor:
    """``dy [M, N]`` -> ``dx [M, K]`` = dy @ W."""
    m, n = dy.shape
    dx = dy.new_empty(m, k_in)
    conv.grad_input(dy, values, col_ptr, col_row_idx, col_perm, dx, (m, 1, 1, n), (m, 1, 1, k_in), *_ONE, _tf32(dy))
    return dx


def grad_weight(x, dy, row_idx, col_idx, groups, counters, block, out=None, own_blocks=None) -> torch.Tensor:
    """``x [M, K]``, ``dy [M, N]`` -> packed ``(dy^T @ x)`` at the active blocks, ``[nnz, bn, bk]``;
    the other arguments are the layout's weight-gradient metadata, ``out`` and ``own_blocks`` (see
    :func:`conv.grad_weight`)."""
    m, k = x.shape
    return conv.grad_weight(x, dy, row_idx, col_idx, groups, counters, block, (m, 1, 1, k), (m, 1, 1, dy.shape[1]),
                            *_ONE, _tf32(x), out, own_blocks)
