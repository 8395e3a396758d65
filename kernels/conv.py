"""Block-sparse conv2d as implicit GEMM over NHWC input (Triton).

The weight is the matrix ``W [C_out, R*S*C_in]`` with K ordered ``(r, s, c_in)``, stored
packed as ``values [nnz, b_out, b_in]`` with a :class:`~blockdpr_kernels.BlockLayout`.
A block is a ``(b_out x b_in)`` channel tile at one kernel tap ``(r, s)``.

The im2col matrix is never built: each program gathers the input rows of one kernel
tap on the fly (masked at the batch*spatial edge and at zero padding). Three kernels:

* ``_fwd_kernel``: ``y[m, n-block] = sum over active blocks (n, k) of im2col(x)[m, k-block] @ W_blk^T``;
  one program per (M tile, output-channel block), looping over that block row only.
* ``_dgrad_kernel``: ``dx[m, c-block] = sum over taps t, active blocks (n, (t, c)) of
  col2im(dy)[m, n-block] @ W_blk``; one program per (M tile, input-channel block), looping
  over the active blocks of the columns ``(t, c)`` through the column-compressed view.
* ``_wgrad_kernel``: ``dW_blk = dy[:, n-block]^T @ im2col(x)[:, k-block]`` for active
  blocks only; one program per (active block, M split), fp32 partial sums.

A dense linear layer is the 1x1 conv over ``M`` pixels, so :mod:`.matmul` reuses these
kernels with ``H = W = 1``. Kernels specialise only on block shape, dtype, geometry and
tile config; the layout arrives as index tensors.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(block_ms=(64, 128)):
    """Autotune configs (Hopper-sensible); a single small one under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in block_ms for w, s in ((4, 3), (4, 4), (8, 3), (8, 4))]


# Autotune key: shapes and geometry, never layout contents (triton adds the tensor dtypes).
_KEY = ["M", "H", "W", "C_IN", "C_OUT", "S", "STRIDE", "PAD", "BN", "BK"]


@triton.jit
def _pixels(offs_m, H, W):
    """Split flat pixel indices over a ``[B, H, W]`` grid into ``(b, i, j)``."""
    j = offs_m % W
    t = offs_m // W
    return t // H, t % H, j


@triton.jit
def _tap_rows(b, i, j, in_range, tap, H_SRC, W_SRC,
              S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Pixel rows of the source ``[B, H_SRC, W_SRC, C]`` tensor seen through kernel tap ``tap``.

    Forward / weight grad: ``(i, j)`` is an output pixel, the source is the input.
    Transposed (input grad): ``(i, j)`` is an input pixel, the source is the output grid.
    Returns int64 pixel indices and the mask of rows that exist (not padding, not past M).
    """
    r = tap // S
    s = tap % S
    if TRANSPOSED:
        hs = i + PAD - r
        ws = j + PAD - s
        h = hs // STRIDE
        w = ws // STRIDE
        ok = (hs >= 0) & (ws >= 0) & (hs % STRIDE == 0) & (ws % STRIDE == 0) & (h < H_SRC) & (w < W_SRC)
    else:
        h = i * STRIDE - PAD + r
        w = j * STRIDE - PAD + s
        ok = (h >= 0) & (h < H_SRC) & (w >= 0) & (w < W_SRC)
    return ((b * H_SRC + h) * W_SRC + w).to(tl.int64), ok & in_range


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _fwd_kernel(x_ptr, v_ptr, row_ptr, col_idx, bias_ptr, y_ptr,
                M, H, W, P, Q, C_IN, C_OUT,
                S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """y [B*P*Q, C_OUT] = im2col(x [B*H*W, C_IN]) @ W^T (+ bias); W packed in v [nnz, BN, BK]."""
    pid = tl.program_id(0)
    n_blocks = C_OUT // BN
    n = pid % n_blocks  # output-channel blocks fastest: neighbours share the x rows in L2
    offs_m = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    b, i, j = _pixels(offs_m, P, Q)
    k_blocks = C_IN // BK
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for blk in range(tl.load(row_ptr + n), tl.load(row_ptr + n + 1)):
        kb = tl.load(col_idx + blk)
        rows, ok = _tap_rows(b, i, j, offs_m < M, kb // k_blocks, H, W, S, STRIDE, PAD, False)
        a = tl.load(x_ptr + rows[:, None] * C_IN + (kb % k_blocks) * BK + offs_k[None, :],
                    mask=ok[:, None], other=0.0)
        w_t = tl.load(v_ptr + blk * (BN * BK) + offs_n[None, :] * BK + offs_k[:, None])  # [BK, BN]
        acc = tl.dot(a, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n * BN + offs_n)[None, :].to(tl.float32)
    y = y_ptr + offs_m[:, None].to(tl.int64) * C_OUT + n * BN + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


@triton.autotune(configs=_configs(), key=_KEY + ["R"])
@triton.jit
def _dgrad_kernel(dy_ptr, v_ptr, col_ptr, col_row_idx, col_perm, dx_ptr,
                  M, H, W, P, Q, C_IN, C_OUT,
                  R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx [B*H*W, C_IN] = col2im(dy [B*P*Q, C_OUT] @ W); W packed in v [nnz, BN, BK]."""
    pid = tl.program_id(0)
    k_blocks = C_IN // BK
    c = pid % k_blocks
    offs_m = (pid // k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    b, i, j = _pixels(offs_m, H, W)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for tap in range(R * S):
        rows, ok = _tap_rows(b, i, j, offs_m < M, tap, P, Q, S, STRIDE, PAD, True)
        col = tap * k_blocks + c
        for e in range(tl.load(col_ptr + col), tl.load(col_ptr + col + 1)):
            nb = tl.load(col_row_idx + e)
            blk = tl.load(col_perm + e)
            g = tl.load(dy_ptr + rows[:, None] * C_OUT + nb * BN + offs_n[None, :],
                        mask=ok[:, None], other=0.0)
            w = tl.load(v_ptr + blk * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :])  # [BN, BK]
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
    dx = dx_ptr + offs_m[:, None].to(tl.int64) * C_IN + c * BK + offs_k[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def _wgrad_kernel(x_ptr, dy_ptr, row_idx, col_idx, dv_ptr,
                  M, H, W, P, Q, C_IN, C_OUT,
                  S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dv[split, blk] = dy[:, n-block]^T @ im2col(x)[:, k-block] over this split's share of M = B*P*Q.

    Grid ``(nnz, n_splits)``; dv is fp32 ``[n_splits, nnz, BN, BK]``, summed over splits by the caller.
    """
    blk = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n = tl.load(row_idx + blk)
    kb = tl.load(col_idx + blk)
    k_blocks = C_IN // BK
    tap = kb // k_blocks
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(tiles, n_splits)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(split * per_split, tl.minimum(tiles, (split + 1) * per_split)):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        b, i, j = _pixels(offs_m, P, Q)
        rows, ok = _tap_rows(b, i, j, offs_m < M, tap, H, W, S, STRIDE, PAD, False)
        g_t = tl.load(dy_ptr + offs_m[None, :].to(tl.int64) * C_OUT + n * BN + offs_n[:, None],
                      mask=(offs_m < M)[None, :], other=0.0)  # [BN, BLOCK_M]
        a = tl.load(x_ptr + rows[:, None] * C_IN + (kb % k_blocks) * BK + offs_k[None, :],
                    mask=ok[:, None], other=0.0)
        acc = tl.dot(g_t, a, acc, input_precision=PRECISION)
    out = dv_ptr + (split * tl.num_programs(0) + blk).to(tl.int64) * (BN * BK)
    tl.store(out + offs_n[:, None] * BK + offs_k[None, :], acc)


# ----------------------------------------------------------------------------- launchers

def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 and not INTERPRET else "ieee"


def _geometry(x_shape, y_shape):
    """Size arguments ``H, W, P, Q, C_IN, C_OUT`` of the kernels from NHWC input / output shapes."""
    (_, h, w, c_in), (_, p, q, c_out) = x_shape, y_shape
    return dict(H=h, W=w, P=p, Q=q, C_IN=c_in, C_OUT=c_out)


def _on(device: torch.device):
    """Launch on the tensors' GPU, not merely the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _split_count(nnz: int, m: int, device: torch.device) -> int:
    """M splits for the weight gradient: about 4 programs per SM, at least one M tile each."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # interpreter: small, but enough to exercise the split path in tests
    m_tiles = triton.cdiv(m, min(c.kwargs["BLOCK_M"] for c in _wgrad_kernel.configs))
    return max(1, min(m_tiles, triton.cdiv(target, nnz)))


def forward(x, values, row_ptr, col_idx, bias, y, kernel_size, stride, padding, allow_tf32):
    """Fill ``y [B, P, Q, C_out]`` (contiguous) from ``x [B, H, W, C_in]`` (contiguous).

    ``values [nnz, C_out-block, C_in-block]`` with layout ``row_ptr``/``col_idx``; ``bias [C_out]`` or None.
    """
    (_, s), (bn, bk) = kernel_size, values.shape[1:]
    geo = _geometry(x.shape, y.shape)
    m = y.shape[0] * geo["P"] * geo["Q"]
    if values.shape[0] == 0 or m == 0:  # no active block or no rows: nothing to launch
        y.zero_()
        if bias is not None:
            y += bias
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * (geo["C_OUT"] // bn),)
    with _on(x.device):
        _fwd_kernel[grid](x, values, row_ptr, col_idx, y if bias is None else bias, y, m, **geo,
                          S=s, STRIDE=stride, PAD=padding, BN=bn, BK=bk, HAS_BIAS=bias is not None,
                          PRECISION=_precision(x.dtype, allow_tf32))
    return y


def grad_input(dy, values, col_ptr, col_row_idx, col_perm, dx, kernel_size, stride, padding, allow_tf32):
    """Fill ``dx [B, H, W, C_in]`` from ``dy [B, P, Q, C_out]`` (both contiguous), via the column view."""
    (r, s), (bn, bk) = kernel_size, values.shape[1:]
    geo = _geometry(dx.shape, dy.shape)
    m = dx.shape[0] * geo["H"] * geo["W"]
    if values.shape[0] == 0 or m == 0:
        return dx.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * (geo["C_IN"] // bk),)
    with _on(dy.device):
        _dgrad_kernel[grid](dy, values, col_ptr, col_row_idx, col_perm, dx, m, **geo,
                            R=r, S=s, STRIDE=stride, PAD=padding, BN=bn, BK=bk,
                            PRECISION=_precision(dy.dtype, allow_tf32))
    return dx


def grad_weight(x, dy, row_idx, col_idx, block, kernel_size, stride, padding, allow_tf32):
    """Packed weight gradient ``[nnz, bn, bk]`` (dtype of x) for the active blocks only.

    ``x [B, H, W, C_in]``, ``dy [B, P, Q, C_out]`` contiguous; ``row_idx``/``col_idx`` of each packed block.
    """
    (_, s), (bn, bk) = kernel_size, block
    nnz = row_idx.shape[0]
    geo = _geometry(x.shape, dy.shape)
    m = dy.shape[0] * geo["P"] * geo["Q"]
    if nnz == 0 or m == 0:
        return x.new_zeros(nnz, bn, bk)
    splits = _split_count(nnz, m, x.device)
    partial = torch.empty(splits, nnz, bn, bk, device=x.device, dtype=torch.float32)
    with _on(x.device):
        _wgrad_kernel[(nnz, splits)](x, dy, row_idx, col_idx, partial, m, **geo,
                                     S=s, STRIDE=stride, PAD=padding, BN=bn, BK=bk,
                                     PRECISION=_precision(x.dtype, allow_tf32))
    return partial.sum(0).to(x.dtype)
