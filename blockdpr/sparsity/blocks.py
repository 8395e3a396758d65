"""Block geometry of sparse weights, shared by the packed (kernel) and masked (reference) storage.

A conv weight [C_out, C_in, kh, kw] is viewed as the matrix [C_out, kh * kw * C_in] with the K axis
ordered (kh, kw, C_in), the layout of the block-sparse kernels; a block is a (b_out x b_in)
channel tile at one kernel tap. A linear weight [N, K] is its own matrix.
"""

from __future__ import annotations

import torch


def weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, kh, kw] -> [C_out, kh * kw * C_in] (a copy); a 2-D weight is returned as is."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def matrix_to_weight(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of weight_to_matrix for a weight of `shape`."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    c_out, c_in, kh, kw = shape
    return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)


def block_grid(shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> tuple[int, int] | None:
    """Block grid (rows, cols) of a weight of `shape`, or None if the block does not tile it.

    For a conv the block must divide C_out and C_in (a block never straddles two taps).
    """
    b_out, b_in = block
    c_out, c_in = shape[0], shape[1]
    if c_out % b_out or c_in % b_in:
        return None
    taps = 1 if len(shape) == 2 else shape[2] * shape[3]
    return c_out // b_out, taps * c_in // b_in


def block_means(matrix: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Mean |w| of every block: matrix [N, K] -> float32 [N / b_out, K / b_in]."""
    b_out, b_in = block
    n, k = matrix.shape
    return matrix.detach().abs().float().reshape(n // b_out, b_out, k // b_in, b_in).mean(dim=(1, 3))


def expand_blocks(grid_mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block mask [N / b_out, K / b_in] -> element mask [N, K] of the matrix."""
    return grid_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
