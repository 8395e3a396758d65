"""The ops as ``torch.library`` custom ops (namespace ``blockdpr_kernels``): what ``torch.compile`` sees.

Each op has a fake (meta) implementation, so dynamo traces models using them without graph breaks,
and the forward ops have their backward registered with ``torch.library.register_autograd``,
calling the gradient ops. The layout enters as the ``idx`` list of its tensors (see
:mod:`.functions`): tensors are data, so a new layout never recompiles a kernel, and their sizes are
sizes to dynamo (dynamic after a reallocation), where int attributes of a module would be guarded as
constants; the two ints the launchers need (the weight-gradient split count and the density bucket)
are the layout's O(1) functions of these sizes and the device.

Eager calls do not come here: :mod:`.ops` calls the autograd Functions of :mod:`.functions`
directly (no dispatcher, no custom-op wrapping per call) unless ``torch.compiler.is_compiling()``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import functions

__all__ = ["linear", "conv2d"]


@torch.library.custom_op("blockdpr_kernels::linear", mutates_args=())
def linear(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor], backend: str) -> Tensor:
    return functions.linear(x, values, idx, bias, backend)


@linear.register_fake
def _(x, values, idx, bias, backend):
    return x.new_empty(x.shape[0], functions.block_grid(idx)[0] * values.shape[1])


@torch.library.custom_op("blockdpr_kernels::linear_grad_input", mutates_args=())
def _linear_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], backend: str) -> Tensor:
    return functions.linear_grad_input(dy, values, idx, backend)


@_linear_grad_input.register_fake
def _(dy, values, idx, backend):
    return dy.new_empty(dy.shape[0], functions.block_grid(idx)[1] * values.shape[2])


@torch.library.custom_op("blockdpr_kernels::linear_grad_weight", mutates_args=())
def _linear_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor], backend: str) -> Tensor:
    return functions.linear_grad_weight(x, dy, values, idx, backend)


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
    db = dy.sum(0) if need[3] else None
    return dx, dv, [None] * len(idx), db, None


torch.library.register_autograd("blockdpr_kernels::linear", _linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("blockdpr_kernels::conv2d", mutates_args=())
def conv2d(x: Tensor, values: Tensor, idx: List[Tensor], bias: Optional[Tensor], kernel_size: List[int],
           stride: int, padding: int, backend: str) -> Tensor:
    return functions.conv2d(x, values, idx, bias, kernel_size, stride, padding, backend)


@conv2d.register_fake
def _(x, values, idx, bias, kernel_size, stride, padding, backend):
    return functions.conv2d_out(x, values, idx, kernel_size, stride, padding)


@torch.library.custom_op("blockdpr_kernels::conv2d_grad_input", mutates_args=())
def _conv2d_grad_input(dy: Tensor, values: Tensor, idx: List[Tensor], x_shape: List[int], kernel_size: List[int],
                       stride: int, padding: int, backend: str) -> Tensor:
    return functions.conv2d_grad_input(dy, values, idx, x_shape, kernel_size, stride, padding, backend)


@_conv2d_grad_input.register_fake
def _(dy, values, idx, x_shape, kernel_size, stride, padding, backend):
    return functions.empty_channels_last(x_shape, dy)


@torch.library.custom_op("blockdpr_kernels::conv2d_grad_weight", mutates_args=())
def _conv2d_grad_weight(x: Tensor, dy: Tensor, values: Tensor, idx: List[Tensor], kernel_size: List[int],
                        stride: int, padding: int, backend: str) -> Tensor:
    return functions.conv2d_grad_weight(x, dy, values, idx, kernel_size, stride, padding, backend)


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
    db = dy.sum((0, 2, 3)) if need[3] else None
    return (dx, dv, [None] * len(idx), db) + (None,) * 4


torch.library.register_autograd("blockdpr_kernels::conv2d", _conv2d_backward, setup_context=_conv2d_setup)
