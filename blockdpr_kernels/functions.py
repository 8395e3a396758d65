"""What the ops compute, per backend, and the eager autograd over it.

The six implementation functions (forward, input gradient, weight gradient of linear and conv2d)
take the layout as one list of its tensors,
``idx = [row_ptr, col_idx, row_idx, col_ptr, col_row_idx, col_perm, wgrad_groups, wgrad_counters, row_prefix]``
(see :func:`layout_tensors`), and run the Triton launchers or the plain-torch reference. Per call
they allocate the output and launch; everything else was built with the layout. They back both
paths of :mod:`.ops`:

* eager: :class:`Linear` and :class:`Conv2d`, ``torch.autograd.Function`` s with a backward
  (``once_differentiable``: double backward raises) and a forward-mode rule (``jvp``: the ops are
  linear in each input, so ``y_dot = op(x_dot, values) + op(x, values_dot) + bias_dot``). They take
  ``ctx`` in ``forward``, which ``apply`` calls without binding its arguments by signature (about
  40 us less per call than the ``setup_context`` style); their subclasses :class:`LinearTransformable`
  and :class:`Conv2dTransformable` are the ``setup_context`` style that ``torch.func`` transforms
  require, used while a transform is active;
* compiled: the ``torch.library`` custom ops of :mod:`.library`, which ``torch.compile`` traces.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import reference

try:
    from . import conv, matmul
except ImportError:  # triton missing: reference only
    conv = matmul = None

__all__ = ["layout_tensors", "block_grid", "empty_channels_last", "conv_out_hw", "conv2d_out",
           "Linear", "LinearTransformable", "Conv2d", "Conv2dTransformable",
           "linear", "linear_grad_input", "linear_grad_weight",
           "conv2d", "conv2d_grad_input", "conv2d_grad_weight"]


def _first_order(backward):
    """``once_differentiable`` (a second backward through the gradients raises), entered only when grad
    mode is on (``create_graph=True``); a plain backward runs with grad mode off, so it skips the wrapper's
    ``no_grad`` context."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return once(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)
    return wrapper


def layout_tensors(layout) -> List[Tensor]:
    """The ``idx`` list of a :class:`~blockdpr_kernels.BlockLayout` (order: see the module docstring); a
    layout sharing a :class:`~blockdpr_kernels.PackedStorage` adds its own blocks' block rows
    (``local_row_idx``, int32 ``[nnz]``): the weight gradient is then zero outside the layout's rows of the
    storage, and its split count follows the layout's own block count (the size of that tensor) rather
    than its run capacity."""
    idx = [layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.col_row_idx, layout.col_perm,
           layout.wgrad_groups, layout.wgrad_counters, layout.row_prefix]
    return idx if layout.storage is None else idx + [layout.local_row_idx]


def _shared_out(values: Tensor, idx: List[Tensor]):
    """``(out, nnz)`` for the weight-gradient launchers: for a shared layout (``idx`` has 10 tensors) zeros
    of the storage's shape and the layout's own block count, else ``(None, None)``."""
    return (torch.zeros_like(values), idx[9].shape[0]) if len(idx) > 9 else (None, None)


def block_grid(idx: List[Tensor]):
    return idx[0].shape[0] - 1, idx[3].shape[0] - 1


# ----------------------------------------------------------------------------- linear

def linear(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor], backend: str) -> Tensor:
    """``x [M, K]`` -> ``[M, N]``."""
    grid = block_grid(idx)
    if backend == "triton":
        return matmul.forward(x, values, idx[8], idx[1], bias, grid[0] * values.shape[1])
    return reference.linear(x, values, idx[2], idx[1], grid, bias)


def linear_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], backend: str) -> Tensor:
    """``dy [M, N]`` -> ``dx [M, K]``."""
    grid = block_grid(idx)
    if backend == "triton":
        return matmul.grad_input(dy, values, idx[3], idx[4], idx[5], grid[1] * values.shape[2])
    return reference.linear_grad_input(dy, values, idx[2], idx[1], grid)


def linear_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor], backend: str) -> Tensor:
    """Packed ``[nnz, bn, bk]`` gradient of the values."""
    block = tuple(values.shape[1:])
    if backend == "triton":
        return matmul.grad_weight(x, dy, idx[2], idx[1], idx[6], idx[7], block, *_shared_out(values, idx))
    return reference.linear_grad_weight(x, dy, idx[2], idx[1], block)


def _save(ctx, x, values, idx, extra):
    ctx.save_for_backward(x, values)
    if forward_ad._current_level >= 0:  # for jvp; outside every dual level no tensor has a tangent
        ctx.save_for_forward(x, values)
    ctx.idx, ctx.extra = idx, extra


class Linear(torch.autograd.Function):
    """``Linear.apply(x [M, K], values, bias, idx, backend)``: :func:`linear` with autograd (eager path)."""

    @staticmethod
    def forward(ctx, x, values, bias, idx, backend):
        _save(ctx, x, values, idx, backend)
        return linear(x, values, idx, bias, backend)

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        dy = dy.contiguous()
        need = ctx.needs_input_grad
        dx = linear_grad_input(dy, values, ctx.idx, ctx.extra) if need[0] else None
        dv = linear_grad_weight(x, dy, values, ctx.idx, ctx.extra) if need[1] else None
        db = dy.sum(0) if need[2] else None  # one reduction; torch accumulates half sums in fp32
        return dx, dv, db, None, None

    @staticmethod
    def jvp(ctx, x_dot, values_dot, bias_dot, _idx, _backend):
        x, values = ctx.saved_tensors
        op = torch.ops.blockdpr_kernels.linear  # see _sum_tangents for why the custom op
        terms = []
        if x_dot is not None:
            terms.append(op(x_dot.contiguous(), values, ctx.idx, None, ctx.extra))
        if values_dot is not None:
            terms.append(op(x, values_dot.contiguous(), ctx.idx, None, ctx.extra))
        return _sum_tangents(terms, bias_dot, (x.shape[0], block_grid(ctx.idx)[0] * values.shape[1]), x)


class LinearTransformable(Linear):
    """:class:`Linear` in the ``setup_context`` style, for ``torch.func`` transforms."""

    @staticmethod
    def forward(x, values, bias, idx, backend):
        return linear(x, values, idx, bias, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, idx, backend = inputs
        _save(ctx, x, values, idx, backend)


# ----------------------------------------------------------------------------- conv2d

def _tf32(t: Tensor) -> bool:
    """Whether TF32 is allowed for ``t``'s conv (torch's flag is read only for fp32: it costs ~0.5 us)."""
    return t.dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _nhwc(shape) -> tuple:
    """The NHWC sizes of a channels_last NCHW shape (whose memory is that NHWC array)."""
    return shape[0], shape[2], shape[3], shape[1]


def empty_channels_last(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def conv_out_hw(h: int, w: int, kernel_size, stride: int, padding: int):
    """Output spatial size ``(P, Q)``."""
    return (h + 2 * padding - kernel_size[0]) // stride + 1, (w + 2 * padding - kernel_size[1]) // stride + 1


def conv2d_out(x: Tensor, values: Tensor, idx: List[Tensor], kernel_size, stride: int, padding: int) -> Tensor:
    """Empty channels_last output ``[B, C_out, P, Q]``."""
    p, q = conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding)
    return empty_channels_last((x.shape[0], block_grid(idx)[0] * values.shape[1], p, q), x)


def conv2d(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor], kernel_size: List[int],
           stride: int, padding: int, backend: str) -> Tensor:
    """``x [B, C_in, H, W]`` channels_last -> ``[B, C_out, P, Q]`` channels_last."""
    if backend == "triton":
        y = conv2d_out(x, values, idx, kernel_size, stride, padding)
        conv.forward(x, values, idx[8], idx[1], bias, y, _nhwc(x.shape), _nhwc(y.shape), kernel_size, stride,
                     padding, _tf32(x))
        return y
    return reference.conv2d(x, values, idx[2], idx[1], block_grid(idx), kernel_size, stride, padding, bias)


def conv2d_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], x_shape: List[int], kernel_size: List[int],
                      stride: int, padding: int, backend: str) -> Tensor:
    """``dy [B, C_out, P, Q]`` -> ``dx [B, C_in, H, W]``, both channels_last."""
    if backend == "triton":
        dx = empty_channels_last(x_shape, dy)
        conv.grad_input(dy, values, idx[3], idx[4], idx[5], dx, _nhwc(dy.shape), _nhwc(x_shape), kernel_size,
                        stride, padding, _tf32(dy))
        return dx
    return reference.conv2d_grad_input(dy, values, idx[2], idx[1], block_grid(idx), x_shape, kernel_size, stride,
                                       padding)


def conv2d_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor], kernel_size: List[int],
                       stride: int, padding: int, backend: str) -> Tensor:
    """Packed ``[nnz, b_out, b_in]`` gradient of the values."""
    block = tuple(values.shape[1:])
    if backend == "triton":
        return conv.grad_weight(x, dy, idx[2], idx[1], idx[6], idx[7], block, _nhwc(x.shape), _nhwc(dy.shape),
                                kernel_size, stride, padding, _tf32(x), *_shared_out(values, idx))
    return reference.conv2d_grad_weight(x, dy, idx[2], idx[1], block, kernel_size, stride, padding)


class Conv2d(torch.autograd.Function):
    """``Conv2d.apply(x, values, bias, idx, kernel_size, stride, padding, backend)``: :func:`conv2d` with
    autograd (eager path)."""

    @staticmethod
    def forward(ctx, x, values, bias, idx, kernel_size, stride, padding, backend):
        _save(ctx, x, values, idx, (kernel_size, stride, padding, backend))
        return conv2d(x, values, idx, bias, kernel_size, stride, padding, backend)

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        need = ctx.needs_input_grad
        dx = conv2d_grad_input(dy, values, ctx.idx, list(x.shape), *ctx.extra) if need[0] else None
        dv = conv2d_grad_weight(x, dy, values, ctx.idx, *ctx.extra) if need[1] else None
        db = dy.sum((0, 2, 3)) if need[2] else None
        return dx, dv, db, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, values_dot, bias_dot, *_):
        x, values = ctx.saved_tensors
        (r, s), stride, padding, backend = ctx.extra
        op = torch.ops.blockdpr_kernels.conv2d  # see _sum_tangents for why the custom op
        terms = []
        if x_dot is not None:
            terms.append(op(x_dot.contiguous(memory_format=torch.channels_last), values, ctx.idx, None, [r, s],
                            stride, padding, backend))
        if values_dot is not None:
            terms.append(op(x, values_dot.contiguous(), ctx.idx, None, [r, s], stride, padding, backend))
        bias_dot = None if bias_dot is None else bias_dot[:, None, None]
        p, q = conv_out_hw(x.shape[2], x.shape[3], (r, s), stride, padding)
        y_dot = _sum_tangents(terms, bias_dot, (x.shape[0], block_grid(ctx.idx)[0] * values.shape[1], p, q), x)
        return y_dot.contiguous(memory_format=torch.channels_last)


class Conv2dTransformable(Conv2d):
    """:class:`Conv2d` in the ``setup_context`` style, for ``torch.func`` transforms."""

    @staticmethod
    def forward(x, values, bias, idx, kernel_size, stride, padding, backend):
        return conv2d(x, values, idx, bias, kernel_size, stride, padding, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, idx, kernel_size, stride, padding, backend = inputs
        _save(ctx, x, values, idx, (kernel_size, stride, padding, backend))


def _sum_tangents(terms: List[Tensor], bias_dot: Optional[Tensor], shape, like: Tensor) -> Tensor:
    """The output tangent: the sum of the linear terms and the (broadcast) bias tangent; zeros if none.

    The terms come from the custom ops of :mod:`.library` (registered when :mod:`.ops` is imported),
    not from the launchers directly: under ``torch.func.jvp`` the saved tensors and tangents are
    functorch wrappers, which the dispatcher unwraps for a custom op and a Triton launch cannot."""
    y_dot = terms[0] if terms else like.new_zeros(shape)
    for t in terms[1:]:
        y_dot = y_dot + t
    return y_dot if bias_dot is None else y_dot + bias_dot
