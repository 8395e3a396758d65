"""Plain-torch versions of every op: the test oracle and the CPU / no-triton fallback.

Each op computes what the kernels compute: a sum over the *stored* blocks only, as batched
matmuls of the gathered input blocks with the packed values (``block_matmul``); a conv first
unfolds its input into the im2col matrix (K ordered ``(r, s, c_in)``). Absent blocks are exact
zeros that are never read, so a NaN or Inf in the input reaches exactly the outputs that a stored
block connects it to, on this backend and on triton alike (a dense weight with zeros would turn
``0 * Inf`` into NaN everywhere). Layouts are passed as index tensors (``row_idx``, ``col_idx``:
block row / column of each packed block, int32 ``[nnz]``) so the same functions back the custom
ops. Half-precision inputs are computed in fp32 and the result is cast back (fp32 accumulation,
like the kernels); fp64 stays fp64 (for gradcheck).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "dense_weight", "gather_blocks", "block_matmul",
    "linear", "linear_grad_input", "linear_grad_weight",
    "conv2d", "conv2d_grad_input", "conv2d_grad_weight",
]

_CHUNK = 1 << 24  # elements of the gathered operand and products per batched matmul (bounds the memory)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _without_autocast(fn):
    """Run ``fn`` with autocast off on its first argument's device: the ops cast their inputs themselves,
    and the reference accumulates in fp32 / fp64 as the kernels do."""
    @functools.wraps(fn)
    def wrapper(a, *args, **kwargs):
        with torch.autocast(a.device.type, enabled=False):
            return fn(a, *args, **kwargs)
    return wrapper


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


@_without_autocast
def block_matmul(a: torch.Tensor, values: torch.Tensor, in_idx: torch.Tensor, out_idx: torch.Tensor,
                 n_out: int, transpose: bool) -> torch.Tensor:
    """``out[:, o] = sum over packed blocks z with out_idx[z] = o of a[:, in_idx[z]] @ B_z``, blockwise.

    ``a [M, in_idx blocks * b_in]``; ``B_z = values[z]^T`` (``transpose=False``: the forward, inputs
    are block columns, outputs block rows) or ``values[z]`` (``transpose=True``: the input gradient).
    Returns ``[M, n_out * b_out]`` in ``a``'s dtype. Reads only the stored blocks.
    """
    w = values if transpose else values.transpose(1, 2)  # [nnz, b_in, b_out]
    nnz, b_in, b_out = w.shape
    m = a.shape[0]
    out = a.new_zeros(n_out, m, b_out)
    blocks = a.view(m, -1, b_in)
    step = max(1, _CHUNK // max(1, nnz * (b_in + b_out)))
    for lo in range(0, m, step):  # row chunks: the gathered [nnz, rows, b_in] stays bounded
        gathered = blocks[lo:lo + step].index_select(1, in_idx).transpose(0, 1)  # [nnz, rows, b_in]
        out[:, lo:lo + step].index_add_(0, out_idx, torch.bmm(gathered, w))
    return out.transpose(0, 1).reshape(m, n_out * b_out)


def linear(x, values, row_idx, col_idx, grid, bias=None):
    """``x [M, K] @ W^T + bias`` -> ``[M, N]``."""
    y = block_matmul(_acc(x), _acc(values), col_idx, row_idx, grid[0], transpose=False)
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


def linear_grad_input(dy, values, row_idx, col_idx, grid):
    """``dy [M, N] @ W`` -> ``[M, K]``."""
    return block_matmul(_acc(dy), _acc(values), row_idx, col_idx, grid[1], transpose=True).to(dy.dtype)


@_without_autocast
def linear_grad_weight(x, dy, row_idx, col_idx, block):
    """Packed ``(dy^T @ x)`` at the active blocks -> ``[nnz, bn, bk]``."""
    return gather_blocks(_acc(dy).t() @ _acc(x), row_idx, col_idx, block).to(x.dtype)


def _im2col(x, kernel_size, stride, padding):
    """``x [B, C, H, W]`` -> ``[B * P * Q, R * S * C]`` with K ordered ``(r, s, c)``."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel_size, padding=padding, stride=stride)  # [B, C * R * S, P * Q], K as (c, r, s)
    return cols.view(b, c, -1, cols.shape[-1]).permute(0, 3, 2, 1).reshape(-1, cols.shape[1])


def _nchw(rows, b, p, q):
    """``[B * P * Q, C]`` rows -> ``[B, C, P, Q]`` channels_last (a view)."""
    return rows.view(b, p, q, -1).permute(0, 3, 1, 2)


def conv2d(x, values, row_idx, col_idx, grid, kernel_size, stride, padding, bias=None):
    """Conv2d of ``x [B, C_in, H, W]`` -> ``[B, C_out, P, Q]`` (channels_last)."""
    b, _, h, w = x.shape
    p, q = ((n + 2 * padding - k) // stride + 1 for n, k in zip((h, w), kernel_size))
    y = _nchw(block_matmul(_im2col(_acc(x), kernel_size, stride, padding), _acc(values), col_idx, row_idx,
                           grid[0], transpose=False), b, p, q)
    if bias is not None:
        y = y + _acc(bias)[:, None, None]
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def conv2d_grad_input(dy, values, row_idx, col_idx, grid, x_shape, kernel_size, stride, padding):
    """Input gradient ``[B, C_in, H, W]`` (channels_last) of :func:`conv2d`: col2im of ``dy @ W``."""
    b, c_in, h, w = x_shape
    rows = _acc(dy).permute(0, 2, 3, 1).reshape(-1, dy.shape[1])
    cols = block_matmul(rows, _acc(values), row_idx, col_idx, grid[1], transpose=True)  # [B*P*Q, R*S*C_in]
    taps = kernel_size[0] * kernel_size[1]
    cols = cols.view(b, -1, taps, c_in).permute(0, 3, 2, 1).reshape(b, c_in * taps, -1)  # K as (c, r, s)
    dx = F.fold(cols, (h, w), kernel_size, padding=padding, stride=stride)
    return dx.to(dy.dtype).contiguous(memory_format=torch.channels_last)


@_without_autocast
def conv2d_grad_weight(x, dy, row_idx, col_idx, block, kernel_size, stride, padding):
    """Packed weight gradient ``[nnz, b_out, b_in]`` of :func:`conv2d`, active blocks only."""
    c_out, c_in = dy.shape[1], x.shape[1]
    dw = torch.nn.grad.conv2d_weight(_acc(x), (c_out, c_in, *kernel_size), _acc(dy), stride, padding)
    dw = dw.permute(0, 2, 3, 1).reshape(c_out, -1)
    return gather_blocks(dw, row_idx, col_idx, block).to(x.dtype)
