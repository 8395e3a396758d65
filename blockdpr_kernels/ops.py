"""Public ops: input validation, backend choice, torch.library custom ops and autograd.

Every op is a ``torch.library`` custom op (namespace ``blockdpr_kernels``) with a fake
(meta) implementation, so ``torch.compile`` traces models using them without graph
breaks; the layout enters as index tensors, so a new layout with the same number of
blocks re-uses the compiled graph and the compiled kernels. Backward passes are
registered with ``torch.library.register_autograd`` (an autograd.Function under the
hood) and call the gradient custom ops.

Backends: ``"triton"`` runs the kernels (CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before import); ``"reference"`` runs plain torch;
``"auto"`` picks triton for CUDA tensors when triton is installed, else reference.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import reference
from .layout import BlockLayout

try:
    from . import conv, matmul
    HAS_TRITON = True
except ImportError:  # triton missing: reference only
    conv = matmul = None
    HAS_TRITON = False

__all__ = ["block_sparse_linear", "block_sparse_conv2d", "LINEAR_BLOCKS", "CONV_BLOCKS", "BACKENDS"]

LINEAR_BLOCKS = (16, 32, 64, 128)
CONV_BLOCKS = (16, 32, 64)
BACKENDS = ("auto", "triton", "reference")
CONV_STRIDES = (1, 2)
CONV_PADDINGS = (0, 1)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- custom ops
# A layout enters every op as one list of its tensors (see BlockLayout and _layout_tensors):
#   idx = [row_ptr, col_idx, row_idx, col_ptr, col_row_idx, col_perm, wgrad_groups, wgrad_counters, row_prefix]
# Tensors are data, so a new layout never recompiles a kernel, and their sizes are sizes to dynamo (dynamic
# after a reallocation), where int attributes of a module would be guarded as constants: the two ints the
# launchers need (the weight-gradient split count and the density bucket) are the layout's functions of
# these sizes and the device, recomputed by the launchers in O(1) Python. Per call an op allocates its
# output and launches its kernel; everything else was built with the layout.

def _grid(idx: List[Tensor]):
    return idx[0].shape[0] - 1, idx[3].shape[0] - 1


def _bias_grad(dy: Tensor, dims) -> Tensor:
    """One reduction; torch accumulates half-precision sums in fp32."""
    return dy.sum(dims)


@torch.library.custom_op("blockdpr_kernels::linear", mutates_args=())
def _linear(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor],
            backend: str) -> Tensor:
    grid = _grid(idx)
    if backend == "triton":
        return matmul.forward(x, values, idx[8], idx[1], bias, grid[0] * values.shape[1])
    return reference.linear(x, values, idx[2], idx[1], grid, bias)


@_linear.register_fake
def _(x, values, idx, bias, backend):
    return x.new_empty(x.shape[0], _grid(idx)[0] * values.shape[1])


@torch.library.custom_op("blockdpr_kernels::linear_grad_input", mutates_args=())
def _linear_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], backend: str) -> Tensor:
    grid = _grid(idx)
    if backend == "triton":
        return matmul.grad_input(dy, values, idx[3], idx[4], idx[5], grid[1] * values.shape[2])
    return reference.linear_grad_input(dy, values, idx[2], idx[1], grid)


@_linear_grad_input.register_fake
def _(dy, values, idx, backend):
    return dy.new_empty(dy.shape[0], _grid(idx)[1] * values.shape[2])


@torch.library.custom_op("blockdpr_kernels::linear_grad_weight", mutates_args=())
def _linear_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor],
                        backend: str) -> Tensor:
    block = tuple(values.shape[1:])
    if backend == "triton":
        return matmul.grad_weight(x, dy, idx[2], idx[1], *idx[6:8], block)
    return reference.linear_grad_weight(x, dy, idx[2], idx[1], block)


@_linear_grad_weight.register_fake
def _(x, dy, values, idx, backend):
    return torch.empty_like(values)


def _linear_setup(ctx, inputs, output):
    x, values, idx, bias, backend = inputs
    ctx.save_for_backward(x, values, *idx)
    ctx.backend = backend


def _linear_backward(ctx, dy):
    x, values, *idx = ctx.saved_tensors
    dy = dy.contiguous()
    need = ctx.needs_input_grad
    dx = _linear_grad_input(dy, values, idx, ctx.backend) if need[0] else None
    dv = _linear_grad_weight(x, dy, values, idx, ctx.backend) if need[1] else None
    db = _bias_grad(dy, 0) if need[3] else None
    return dx, dv, [None] * len(idx), db, None


torch.library.register_autograd("blockdpr_kernels::linear", _linear_backward, setup_context=_linear_setup)


def _conv_out_hw(h: int, w: int, kernel_size, stride: int, padding: int):
    return (h + 2 * padding - kernel_size[0]) // stride + 1, (w + 2 * padding - kernel_size[1]) // stride + 1


def _nhwc(t: Tensor) -> Tensor:
    """The NHWC-contiguous view of a channels_last NCHW tensor."""
    return t.permute(0, 2, 3, 1)


def _empty_cl(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


@torch.library.custom_op("blockdpr_kernels::conv2d", mutates_args=())
def _conv2d(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor],
            kernel_size: List[int], stride: int, padding: int, backend: str) -> Tensor:
    if backend == "triton":
        y = _conv2d_out(x, values, idx, kernel_size, stride, padding)
        conv.forward(_nhwc(x), values, idx[8], idx[1], bias, _nhwc(y), kernel_size, stride, padding,
                     torch.backends.cudnn.allow_tf32)
        return y
    return reference.conv2d(x, values, idx[2], idx[1], _grid(idx), kernel_size, stride, padding, bias)


def _conv2d_out(x, values, idx, kernel_size, stride, padding):
    """Empty channels_last output ``[B, C_out, P, Q]``."""
    p, q = _conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding)
    return _empty_cl((x.shape[0], _grid(idx)[0] * values.shape[1], p, q), x)


@_conv2d.register_fake
def _(x, values, idx, bias, kernel_size, stride, padding, backend):
    return _conv2d_out(x, values, idx, kernel_size, stride, padding)


@torch.library.custom_op("blockdpr_kernels::conv2d_grad_input", mutates_args=())
def _conv2d_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], x_shape: List[int],
                       kernel_size: List[int], stride: int, padding: int, backend: str) -> Tensor:
    if backend == "triton":
        dx = _empty_cl(x_shape, dy)
        conv.grad_input(_nhwc(dy), values, idx[3], idx[4], idx[5], _nhwc(dx), kernel_size, stride,
                        padding, torch.backends.cudnn.allow_tf32)
        return dx
    return reference.conv2d_grad_input(dy, values, idx[2], idx[1], _grid(idx), x_shape, kernel_size, stride,
                                       padding)


@_conv2d_grad_input.register_fake
def _(dy, values, idx, x_shape, kernel_size, stride, padding, backend):
    return _empty_cl(x_shape, dy)


@torch.library.custom_op("blockdpr_kernels::conv2d_grad_weight", mutates_args=())
def _conv2d_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor],
                        kernel_size: List[int], stride: int, padding: int, backend: str) -> Tensor:
    block = tuple(values.shape[1:])
    if backend == "triton":
        return conv.grad_weight(_nhwc(x), _nhwc(dy), idx[2], idx[1], *idx[6:8], block, kernel_size,
                                stride, padding, torch.backends.cudnn.allow_tf32)
    return reference.conv2d_grad_weight(x, dy, idx[2], idx[1], block, kernel_size, stride, padding)


@_conv2d_grad_weight.register_fake
def _(x, dy, values, idx, kernel_size, stride, padding, backend):
    return torch.empty_like(values)


def _conv2d_setup(ctx, inputs, output):
    x, values, idx, bias, kernel_size, stride, padding, backend = inputs
    ctx.save_for_backward(x, values, *idx)
    ctx.geometry = (kernel_size, stride, padding, backend)


def _conv2d_backward(ctx, dy):
    x, values, *idx = ctx.saved_tensors
    dy = dy.contiguous(memory_format=torch.channels_last)
    need = ctx.needs_input_grad
    dx = _conv2d_grad_input(dy, values, idx, list(x.shape), *ctx.geometry) if need[0] else None
    dv = _conv2d_grad_weight(x, dy, values, idx, *ctx.geometry) if need[1] else None
    db = _bias_grad(dy, (0, 2, 3)) if need[3] else None
    return (dx, dv, [None] * len(idx), db) + (None,) * 4


torch.library.register_autograd("blockdpr_kernels::conv2d", _conv2d_backward, setup_context=_conv2d_setup)


# ----------------------------------------------------------------------------- validation

def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend: 'triton' requested but triton is not installed")
        if device.type != "cuda" and not conv.INTERPRET:
            raise ValueError(f"backend: 'triton' needs CUDA tensors (got {device}) unless "
                             "TRITON_INTERPRET=1 is set before blockdpr_kernels is imported")
    return backend


def _autocast(x: Tensor, values, bias):
    """Under torch.autocast, cast floating inputs to the autocast dtype (as F.linear / F.conv2d do)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, values, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    return cast(x), cast(values), cast(bias)


def _check_common(x, values, layout, bias, backend, blocks):
    """Shared checks and autocast; returns ``(backend, x, values, bias)``."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    backend = _resolve_backend(backend, x.device)
    if x.device != layout.device:
        raise ValueError(f"x: expected device {layout.device} (the layout's), got {x.device}")
    x, values, bias = _autocast(x, values, bias)
    dtypes = _KERNEL_DTYPES if backend == "triton" else _KERNEL_DTYPES + (torch.float64,)
    if x.dtype not in dtypes:
        raise TypeError(f"x: expected dtype in {[str(d) for d in dtypes]} for backend {backend!r}, got {x.dtype}")
    layout.check_values(values)
    if values.dtype != x.dtype:
        raise TypeError(f"values: expected dtype {x.dtype} (x's), got {values.dtype}")
    if not values.is_contiguous():
        raise ValueError("values: expected a contiguous [nnz, bn, bk] tensor")
    for name, b in zip(("bn", "bk"), layout.block):
        if b not in blocks:
            raise ValueError(f"layout.block: expected {name} in {blocks}, got {layout.block}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (layout.shape[0],):
            raise ValueError(f"bias: expected shape [{layout.shape[0]}], got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (x's), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected device {x.device} (x's), got {bias.device}")
        if not bias.is_contiguous():
            raise ValueError("bias: expected a contiguous tensor")
    return backend, x, values, bias


def _layout_tensors(layout: BlockLayout) -> List[Tensor]:
    """The ``idx`` list the custom ops take (order: see the custom ops section)."""
    return [layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.col_row_idx, layout.col_perm,
            layout.wgrad_groups, layout.wgrad_counters, layout.row_prefix]


def block_sparse_linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
                        *, backend: str = "auto") -> Tensor:
    """``y = x @ W^T + bias`` with the block-sparse ``W [N, K]`` given as packed ``values``.

    Args:
        x: ``[..., K]`` contiguous, float16 / bfloat16 / float32 (float64: reference only).
        values: ``[nnz, bn, bk]`` contiguous, dtype of ``x``; ``bn, bk`` in 16, 32, 64, 128.
        layout: :class:`BlockLayout` of ``W`` (shape ``(N, K)``), on ``x``'s device.
        bias: optional ``[N]``, dtype of ``x``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., N]`` in ``x``'s dtype (fp32 accumulation). Differentiable in x, values, bias.
        Under ``torch.autocast`` the inputs are first cast to the autocast dtype.
    """
    backend, x, values, bias = _check_common(x, values, layout, bias, backend, LINEAR_BLOCKS)
    n, k = layout.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dim K = {k} (layout.shape[1]), got shape {list(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor")
    y = _linear(x.reshape(-1, k), values, _layout_tensors(layout), bias, backend)
    return y.reshape(*x.shape[:-1], n)


def _pair(v, name):
    """One int from an int or a pair of equal ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name}: expected an int or a pair of equal ints, got {v}")
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return v


def _kernel_size(kernel_size, taps: int):
    if kernel_size is None:
        r = round(taps ** 0.5)
        if r * r != taps:
            raise ValueError(f"kernel_size: layout has {taps} taps, not a square kernel; pass kernel_size")
        return [r, r]
    ks = [kernel_size] * 2 if isinstance(kernel_size, int) else list(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise ValueError(f"kernel_size: expected a positive int or pair of positive ints, got {kernel_size}")
    return ks


def block_sparse_conv2d(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
                        stride=1, padding=0, dilation=1, groups: int = 1, *, kernel_size=None,
                        backend: str = "auto") -> Tensor:
    """Conv2d with a block-sparse weight, as implicit GEMM over NHWC (channels_last) input.

    The weight is the matrix ``W [C_out, R*S*C_in]`` with K ordered ``(r, s, c_in)``
    (``dense_conv_weight.permute(0, 2, 3, 1).reshape(C_out, -1)``); a block is a
    ``(b_out x b_in)`` channel tile at one kernel tap.

    Args:
        x: ``[B, C_in, H, W]`` in channels_last memory format; float16 / bfloat16 / float32.
        values: ``[nnz, b_out, b_in]``, dtype of ``x``; block sizes 16, 32 or 64.
        layout: :class:`BlockLayout` of ``W`` with shape ``(C_out, R*S*C_in)``.
        bias: optional ``[C_out]``.
        stride: 1 or 2. padding: 0 or 1. dilation: 1. groups: 1.
        kernel_size: ``(R, S)`` or int; inferred for square kernels when None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, C_out, P, Q]`` channels_last, ``P = (H + 2*padding - R) // stride + 1``.
        Under ``torch.autocast`` the inputs are first cast to the autocast dtype.
    """
    backend, x, values, bias = _check_common(x, values, layout, bias, backend, CONV_BLOCKS)
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if stride not in CONV_STRIDES:
        raise ValueError(f"stride: expected one of {CONV_STRIDES}, got {stride}")
    if padding not in CONV_PADDINGS:
        raise ValueError(f"padding: expected one of {CONV_PADDINGS}, got {padding}")
    if _pair(dilation, "dilation") != 1:
        raise ValueError(f"dilation: expected 1, got {dilation}")
    if groups != 1:
        raise ValueError(f"groups: expected 1, got {groups}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D [B, C_in, H, W] tensor, got shape {list(x.shape)}")
    c_out, k = layout.shape
    b_out, b_in = layout.block
    c_in = x.shape[1]
    if c_in % b_in:
        raise ValueError(f"x: expected C_in a multiple of the block size b_in = {b_in}, got C_in = {c_in}")
    if k % c_in:
        raise ValueError(f"x: C_in = {c_in} does not divide the layout's K = {k} (= R*S*C_in)")
    ks = _kernel_size(kernel_size, k // c_in)
    if ks[0] * ks[1] * c_in != k:
        raise ValueError(f"layout: expected shape (C_out, R*S*C_in) = (*, {ks[0] * ks[1] * c_in}) for "
                         f"kernel_size {ks} and C_in {c_in}, got {layout.shape}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("x: expected channels_last (NHWC) memory format; use "
                         "x.contiguous(memory_format=torch.channels_last)")
    p, q = _conv_out_hw(x.shape[2], x.shape[3], ks, stride, padding)
    if p < 1 or q < 1:
        raise ValueError(f"x: spatial size {list(x.shape[2:])} is smaller than kernel_size {ks} "
                         f"with padding {padding}")
    return _conv2d(x, values, _layout_tensors(layout), bias, ks, stride, padding, backend)
