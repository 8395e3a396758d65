"""Plain-torch versions of every op: the test oracle and the CPU / no-triton fallback.

Each op scatters the packed values into a dense weight and runs the dense torch op.
Layouts are passed as index tensors (``row_idx``, ``col_idx``: block row / column of
each packed block, int32 ``[nnz]``) so the same functions back the custom ops.
Half-precision inputs are computed in fp32 and the result is cast back (fp32
accumulation, like the kernels); fp64 stays fp64 (for gradcheck).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dense_weight", "gather_blocks",
    "linear", "linear_grad_input", "linear_grad_weight",
    "conv2d", "conv2d_grad_input", "conv2d_grad_weight",
]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def dense_weight(values: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor,
                 grid: tuple[int, int]) -> torch.Tensor:
    """Dense ``[N, K]`` weight from packed ``values [nnz, bn, bk]`` on block grid ``(N/bn, K/bk)``."""
    nb, kb = grid
    bn, bk = values.shape[1:]
    blocks = values.new_zeros(nb, kb, bn, bk).index_put((row_idx.long(), col_idx.long()), values)
    return blocks.transpose(1, 2).reshape(nb * bn, kb * bk)


def gather_blocks(dense: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor,
                  block: tuple[int, int]) -> torch.Tensor:
    """Packed ``[nnz, bn, bk]`` blocks of ``dense [N, K]`` at ``(row_idx, col_idx)``."""
    bn, bk = block
    n, k = dense.shape
    blocks = dense.reshape(n // bn, bn, k // bk, bk).transpose(1, 2)
    return blocks[row_idx.long(), col_idx.long()].contiguous()


def linear(x, values, row_idx, col_idx, grid, bias=None):
    """``x [M, K] @ W^T + bias`` -> ``[M, N]``."""
    w = dense_weight(_acc(values), row_idx, col_idx, grid)
    y = _acc(x) @ w.t()
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


def linear_grad_input(dy, values, row_idx, col_idx, grid):
    """``dy [M, N] @ W`` -> ``[M, K]``."""
    w = dense_weight(_acc(values), row_idx, col_idx, grid)
    return (_acc(dy) @ w).to(dy.dtype)


def linear_grad_weight(x, dy, row_idx, col_idx, block):
    """Packed ``(dy^T @ x)`` at the active blocks -> ``[nnz, bn, bk]``."""
    return gather_blocks(_acc(dy).t() @ _acc(x), row_idx, col_idx, block).to(x.dtype)


def _conv_weight(values, row_idx, col_idx, grid, c_in, kernel_size):
    """Dense conv weight ``[C_out, C_in, R, S]`` from the ``[C_out, R*S*C_in]`` (K = (r, s, c)) matrix."""
    w = dense_weight(_acc(values), row_idx, col_idx, grid)
    return w.reshape(w.shape[0], *kernel_size, c_in).permute(0, 3, 1, 2)


def conv2d(x, values, row_idx, col_idx, grid, kernel_size, stride, padding, bias=None):
    """Conv2d of ``x [B, C_in, H, W]`` -> ``[B, C_out, P, Q]`` (channels_last)."""
    w = _conv_weight(values, row_idx, col_idx, grid, x.shape[1], kernel_size)
    y = F.conv2d(_acc(x), w, None if bias is None else _acc(bias), stride, padding)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def conv2d_grad_input(dy, values, row_idx, col_idx, grid, x_shape, kernel_size, stride, padding):
    """Input gradient ``[B, C_in, H, W]`` (channels_last) of :func:`conv2d`."""
    w = _conv_weight(values, row_idx, col_idx, grid, x_shape[1], kernel_size)
    dx = torch.nn.grad.conv2d_input(list(x_shape), w, _acc(dy), stride, padding)
    return dx.to(dy.dtype).contiguous(memory_format=torch.channels_last)


def conv2d_grad_weight(x, dy, row_idx, col_idx, block, kernel_size, stride, padding):
    """Packed weight gradient ``[nnz, b_out, b_in]`` of :func:`conv2d`, active blocks only."""
    c_out, c_in = dy.shape[1], x.shape[1]
    dw = torch.nn.grad.conv2d_weight(_acc(x), (c_out, c_in, *kernel_size), _acc(dy), stride, padding)
    dw = dw.permute(0, 2, 3, 1).reshape(c_out, -1)
    return gather_blocks(dw, row_idx, col_idx, block).to(x.dtype)
