"""Public ops: input validation, backend choice, and the eager or compiled path.

Eager calls go straight to the ``torch.autograd.Function`` s of :mod:`.functions` (no dispatcher,
no custom-op wrapping per call); under ``torch.compile`` (``torch.compiler.is_compiling()``) the
same computation is the ``torch.library`` custom ops of :mod:`.library`, with fake implementations,
so models using the ops trace without graph breaks, and a new layout with the same number of blocks
re-uses the compiled graph and the compiled kernels.

Backends: ``"triton"`` runs the kernels (CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before import); ``"reference"`` runs plain torch;
``"auto"`` picks triton for CUDA tensors when triton is installed, else reference.

Autograd: backward (once: double backward raises) and forward mode (``torch.func.jvp``,
``torch.autograd.forward_ad``) in eager mode, in x, values and bias.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functions, library
from .layout import BlockLayout

try:
    from . import conv
    HAS_TRITON = True
except ImportError:  # triton missing: reference only
    conv = None
    HAS_TRITON = False

__all__ = ["block_sparse_linear", "block_sparse_conv2d", "LINEAR_BLOCKS", "CONV_BLOCKS", "BACKENDS",
           "BF16_INTERPRETER_REASON"]

LINEAR_BLOCKS = (16, 32, 64, 128)
CONV_BLOCKS = (16, 32, 64)
BACKENDS = ("auto", "triton", "reference")
CONV_STRIDES = (1, 2)
CONV_PADDINGS = (0, 1)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = _KERNEL_DTYPES + (torch.float64,)
BF16_INTERPRETER_REASON = ("the Triton interpreter does not support bf16 tl.dot (triton issue 11584: it multiplies "
                           "raw bit patterns; fp16 and fp32 are right); bf16 runs on a real GPU")


# ----------------------------------------------------------------------------- validation

def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if HAS_TRITON and x.is_cuda else "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend: 'triton' requested but triton is not installed")
        if not x.is_cuda and not conv.CPU_LAUNCH:
            raise ValueError(f"backend: 'triton' needs CUDA tensors (got {x.device}) unless "
                             "TRITON_INTERPRET=1 is set before blockdpr_kernels is imported")
    return backend


def _autocast(x: Tensor, values, bias):
    """Under torch.autocast, cast floating inputs to the autocast dtype (as F.linear / F.conv2d do)."""
    if not torch._C._is_any_autocast_enabled():  # the usual case, without naming a device type
        return x, values, bias
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, values, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    return cast(x), cast(values), cast(bias)


def _check_common(x, values, layout, bias, backend, blocks):
    """Shared checks and autocast; returns ``(backend, x, values, bias)``. Runs per call: each tensor
    property is read once."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    backend = _resolve_backend(backend, x)
    device = x.device
    if device != layout.device:
        raise ValueError(f"x: expected device {layout.device} (the layout's), got {device}")
    x, values, bias = _autocast(x, values, bias)
    dtype = x.dtype
    dtypes = _KERNEL_DTYPES if backend == "triton" else _REFERENCE_DTYPES
    if dtype not in dtypes:
        raise TypeError(f"x: expected dtype in {[str(d) for d in dtypes]} for backend {backend!r}, got {dtype}")
    if dtype == torch.bfloat16 and backend == "triton" and conv.INTERPRET:
        raise TypeError(f"x: torch.bfloat16 with backend 'triton' under TRITON_INTERPRET=1 gives wrong results: "
                        f"{BF16_INTERPRETER_REASON}; use float16 / float32 or backend='reference'")
    layout.check_values(values)
    if values.dtype != dtype:
        raise TypeError(f"values: expected dtype {dtype} (x's), got {values.dtype}")
    if not values.is_contiguous():
        raise ValueError("values: expected a contiguous [nnz, bn, bk] tensor")
    bn, bk = layout.block
    if bn not in blocks or bk not in blocks:
        name = "bn" if bn not in blocks else "bk"
        raise ValueError(f"layout.block: expected {name} in {blocks}, got {layout.block}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (layout.shape[0],):
            raise ValueError(f"bias: expected shape [{layout.shape[0]}], got {list(bias.shape)}")
        if bias.dtype != dtype:
            raise TypeError(f"bias: expected dtype {dtype} (x's), got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias: expected device {device} (x's), got {bias.device}")
        if not bias.is_contiguous():
            raise ValueError("bias: expected a contiguous tensor")
    return backend, x, values, bias


def _operands(values: Tensor, layout: BlockLayout, backend: str):
    """``(values, idx)`` as the backend takes them. The kernels index a shared layout's rows of the whole
    storage; the reference computes over the layout's own rows (gathered: autograd puts their gradient
    into the storage's rows; tensors, not ints, so a compiled model sees a size change, not a new constant)."""
    idx = functions.layout_tensors(layout)
    if layout.storage is not None and backend == "reference":
        if values.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("backend 'reference' over a PackedStorage reads per-layer index tensors that a "
                               "reallocation replaces, so a CUDA graph cannot hold them: capture with backend 'triton'")
        row_idx, col_idx = layout.local_index()
        return values[layout.local_rows], [idx[0], col_idx, row_idx, *idx[3:9]]
    return values, idx


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _eager_path(plain, transformable) -> tuple:
    """``(C-level apply of plain, transformable)``: what :func:`_apply_eager` runs. ``plain.apply`` (Python)
    ends in this C ``apply`` (``torch._C._FunctionBase.apply``); ``plain`` defines no ``setup_context``,
    so ``Function.apply`` would bind no default arguments before it."""
    return super(torch.autograd.Function, plain).apply, transformable


def _apply_eager(path, x, values, bias, *rest):
    """The eager path's autograd Function on ``(x, values, bias, *rest)``: the ``setup_context`` style one
    while a ``torch.func`` transform is active (``Function.apply``'s own check), else the plain one
    through its C ``apply``, after the one step ``Function.apply`` takes without a transform: unwrapping
    tensors that escaped a transform (``torch._functorch.utils.unwrap_dead_wrappers``)."""
    c_apply, transformable = path
    if torch._C._are_functorch_transforms_active():
        return transformable.apply(x, values, bias, *rest)
    return c_apply(_unwrap_if_dead(x), _unwrap_if_dead(values), None if bias is None else _unwrap_if_dead(bias),
                   *rest)


_LINEAR = _eager_path(functions.Linear, functions.LinearTransformable)
_CONV2D = _eager_path(functions.Conv2d, functions.Conv2dTransformable)


def block_sparse_linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
                        *, backend: str = "auto") -> Tensor:
    """``y = x @ W^T + bias`` with the block-sparse ``W [N, K]`` given as packed ``values``.

    Args:
        x: ``[..., K]`` contiguous, float16 / bfloat16 / float32 (float64: reference only).
        values: ``[nnz, bn, bk]`` contiguous, dtype of ``x``; ``bn, bk`` in 16, 32, 64, 128 (a layout sharing
            a :class:`~blockdpr_kernels.PackedStorage`: the storage's values ``[total, bn, bk]``).
        layout: :class:`BlockLayout` of ``W`` (shape ``(N, K)``), on ``x``'s device.
        bias: optional ``[N]``, dtype of ``x``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., N]`` in ``x``'s dtype (fp32 accumulation). Differentiable in x, values, bias (backward
        once, and forward mode in eager mode). Under ``torch.autocast`` the inputs are first cast to
        the autocast dtype.
    """
    backend, x, values, bias = _check_common(x, values, layout, bias, backend, LINEAR_BLOCKS)
    n, k = layout.shape
    dim = x.dim()
    if dim < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dim K = {k} (layout.shape[1]), got shape {list(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor")
    values, idx = _operands(values, layout, backend)
    rows = x if dim == 2 else x.reshape(-1, k)  # no view (and no view node in the backward) for [M, K]
    if torch.compiler.is_compiling():
        y = library.linear(rows, values, idx, bias, backend)
    else:
        y = _apply_eager(_LINEAR, rows, values, bias, idx, backend)
    return y if dim == 2 else y.reshape(*x.shape[:-1], n)


def _pair(v, name):
    """One int from an int or a pair of equal ints."""
    if type(v) is int:  # the common case first: this runs per call
        return v
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name}: expected an int or a pair of equal ints, got {v}")
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    return v


def _kernel_size(kernel_size):
    if type(kernel_size) is int and kernel_size >= 1:  # the common case first: this runs per call
        return [kernel_size, kernel_size]
    ks = [kernel_size] * 2 if isinstance(kernel_size, int) else list(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"kernel_size: expected a positive int or pair of positive ints, got {kernel_size}")
    return ks


def block_sparse_conv2d(x: Tensor, values: Tensor, layout: BlockLayout, bias: Optional[Tensor] = None,
                        stride=1, padding=0, dilation=1, groups: int = 1, *, kernel_size,
                        backend: str = "auto") -> Tensor:
    """Conv2d with a block-sparse weight, as implicit GEMM over NHWC (channels_last) input.

    The weight is the matrix ``W [C_out, R*S*C_in]`` with K ordered ``(r, s, c_in)``
    (``dense_conv_weight.permute(0, 2, 3, 1).reshape(C_out, -1)``); a block is a
    ``(b_out x b_in)`` channel tile at one kernel tap.

    Args:
        x: ``[B, C_in, H, W]`` in channels_last memory format; float16 / bfloat16 / float32.
        values: ``[nnz, b_out, b_in]``, dtype of ``x``; block sizes 16, 32 or 64 (shared layout: the
            storage's values ``[total, b_out, b_in]``).
        layout: :class:`BlockLayout` of ``W`` with shape ``(C_out, R*S*C_in)``.
        bias: optional ``[C_out]``.
        stride: 1 or 2. padding: 0 or 1. dilation: 1. groups: 1.
        kernel_size: ``(R, S)`` or int, required: the layout only knows ``K = R*S*C_in``, which fits more
            than one (kernel size, C_in) pair (K = 576 is 3x3 over 64 channels or 2x2 over 144).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, C_out, P, Q]`` channels_last, ``P = (H + 2*padding - R) // stride + 1``. Differentiable in x,
        values, bias (backward once, and forward mode in eager mode). Under ``torch.autocast`` the
        inputs are first cast to the autocast dtype.
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
    ks = _kernel_size(kernel_size)
    if ks[0] * ks[1] * c_in != k:
        raise ValueError(f"x: C_in = {c_in} does not fit the layout: a {ks[0]}x{ks[1]} kernel over the layout's "
                         f"K = R*S*C_in = {k} expects C_in = {k / (ks[0] * ks[1]):g} (layout shape {layout.shape})")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("x: expected channels_last (NHWC) memory format; use "
                         "x.contiguous(memory_format=torch.channels_last)")
    p, q = functions.conv_out_hw(x.shape[2], x.shape[3], ks, stride, padding)
    if p < 1 or q < 1:
        raise ValueError(f"x: spatial size {list(x.shape[2:])} is smaller than kernel_size {ks} "
                         f"with padding {padding}")
    values, idx = _operands(values, layout, backend)
    if torch.compiler.is_compiling():
        return library.conv2d(x, values, idx, bias, ks, stride, padding, backend)
    return _apply_eager(_CONV2D, x, values, bias, idx, ks, stride, padding, backend)
