"""Block-sparse ``nn.Module`` layers: what another project imports.

:class:`BlockSparseConv2d` and :class:`BlockSparseLinear` store only the active ``(bn, bk)`` blocks
of their weight matrix ``W [N, K]`` as one parameter ``values [nnz, bn, bk]`` (its gradient and any
optimizer state have the same packed shape; no dense copy exists) plus a
:class:`~blockdpr_kernels.BlockLayout` (and an optional dense ``bias [N]``). For a conv,
``W = weight.permute(0, 2, 3, 1).reshape(C_out, kh * kw * C_in)``: K is ordered ``(kh, kw, C_in)``, so
a block is a channel tile at one kernel tap.

    layer = BlockSparseConv2d.from_dense(conv, block=32, density=0.1)   # keeps the largest 10% of blocks

The layout is not in the ``state_dict`` (only ``values`` and ``bias`` are): save ``layer.layout.mask``
with it and rebuild the layer from the mask. ``module.to(device)`` moves the layout too.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layout import BlockLayout
from .ops import block_sparse_conv2d, block_sparse_linear

__all__ = ["BlockSparseConv2d", "BlockSparseLinear"]


class _BlockSparse(nn.Module):
    """Packed ``values`` + layout + optional bias, shared by the conv and linear layers.

    Subclasses set ``weight_shape`` (the dense weight's shape), then call :meth:`_init_params`, and
    implement :meth:`_weight_of` (``W [N, K]`` -> dense weight) and ``forward``.
    """

    weight_shape: tuple[int, ...]

    def _init_params(self, layout: BlockLayout, bias: bool, device, dtype) -> None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
        n, k = self.matrix_shape
        if layout.shape != (n, k):
            raise ValueError(f"layout: expected the weight matrix shape {(n, k)}, got {layout.shape}")
        device = layout.device if device is None else torch.device(device)
        if device != layout.device:
            raise ValueError(f"device: expected the layout's device {layout.device}, got {device}")
        self.layout = layout
        bound = 1 / math.sqrt(k)  # nn.Conv2d / nn.Linear default: kaiming uniform, a = sqrt(5)
        self.values = nn.Parameter(torch.empty(layout.nnz, *layout.block, device=device, dtype=dtype)
                                   .uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, device=device, dtype=dtype).uniform_(-bound, bound)) if bias else None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(N, K)`` of the weight matrix."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    @property
    def block(self) -> tuple[int, int]:
        return self.layout.block

    def set_layout(self, layout: BlockLayout, values: Tensor | None = None) -> nn.Parameter:
        """Install ``layout`` with a new ``values`` Parameter, which is returned (an optimizer holding the
        old one must be told). ``values [layout.nnz, bn, bk]`` when given (e.g. survivors plus zeros after
        a reallocation); else repacked from the current weight: blocks kept keep their values, new
        blocks start at zero."""
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
        if layout.shape != self.layout.shape or layout.block != self.layout.block:
            raise ValueError(f"layout: expected shape {self.layout.shape} and block {self.layout.block}, "
                             f"got {layout.shape} and {layout.block}")
        if values is None:
            values = layout.pack(self.layout.unpack(self.values.detach()))
        layout.check_values(values)
        self.layout = layout
        self.values = nn.Parameter(values.detach().to(self.values.dtype).contiguous())
        return self.values

    def to_dense(self) -> Tensor:
        """The dense weight (``weight_shape``, detached), zeros where no block is stored."""
        return self._weight_of(self.layout.unpack(self.values.detach())).contiguous()

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / ``.half()``: the parameters, then the layout to their device."""
        out = super()._apply(fn, *args, **kwargs)
        if self.values.device != self.layout.device:
            self.layout = self.layout.to(self.values.device)
        return out

    def _cast(self, x: Tensor):
        """(values, bias) in ``x``'s dtype, unless autocast is on (the op then casts to its dtype)."""
        if torch.is_autocast_enabled(x.device.type):
            return self.values, self.bias
        return self.values.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)

    def _repr_blocks(self) -> str:
        total = self.layout.grid[0] * self.layout.grid[1]
        return (f"bias={self.bias is not None}, block={self.layout.block}, "
                f"blocks={self.layout.nnz}/{total} (density {self.layout.nnz / max(1, total):.3f})")

    @classmethod
    def _layout_for(cls, matrix: Tensor, block, density, mask) -> BlockLayout:
        """The layout ``from_dense`` keeps: ``mask``, or the blocks of largest mean ``|w|`` at ``density``."""
        bn, bk = (block, block) if isinstance(block, int) else tuple(block)
        n, k = matrix.shape
        if n % bn or k % bk:
            raise ValueError(f"block: {(bn, bk)} does not tile the weight matrix [{n}, {k}]")
        if (density is None) == (mask is None):
            raise ValueError("from_dense: pass exactly one of density and mask")
        grid = (n // bn, k // bk)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != grid:
                raise ValueError(f"mask: expected a bool tensor of the block grid {list(grid)}, got "
                                 f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__} "
                                 f"{list(getattr(mask, 'shape', []))}")
            return BlockLayout(mask.to(matrix.device), (bn, bk))
        if not 0 < density <= 1:
            raise ValueError(f"density: expected a fraction in (0, 1], got {density}")
        scores = matrix.detach().abs().float().reshape(grid[0], bn, grid[1], bk).mean(dim=(1, 3)).flatten()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.topk(max(1, round(density * scores.numel()))).indices] = True
        return BlockLayout(keep.view(grid), (bn, bk))


class BlockSparseConv2d(_BlockSparse):
    """Conv2d with a block-sparse weight ``[C_out, C_in, kh, kw]`` stored as ``values [nnz, b_out, b_in]``.

    Input ``[B, C_in, H, W]`` (channels_last avoids a copy), output ``[B, C_out, P, Q]`` channels_last,
    in the input's dtype (float16 / bfloat16 / float32; under autocast, the autocast dtype). Stride 1 or
    2, padding 0 or 1, no dilation or groups; ``b_out`` divides ``C_out`` and ``b_in`` divides ``C_in``
    (16, 32 or 64). New values are initialised as ``nn.Conv2d`` initialises its weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, layout: BlockLayout, stride: int = 1,
                 padding: int = 0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight_shape = (out_channels, in_channels, kh, kw)
        self.stride, self.padding = stride, padding
        self._init_params(layout, bias, device, dtype)
        if in_channels % layout.block[1]:
            raise ValueError(f"layout.block: b_in = {layout.block[1]} must divide in_channels = {in_channels} "
                             "(a block never straddles two kernel taps)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block=32, density: float | None = None,
                   mask: Tensor | None = None) -> "BlockSparseConv2d":
        """The block-sparse version of ``conv`` (its weight and bias copied, same device and dtype).

        ``block``: int or ``(b_out, b_in)``. Exactly one of ``density`` (keep that fraction of the
        blocks, at least one, those of largest mean ``|w|``) and ``mask`` (bool ``[C_out / b_out,
        kh * kw * C_in / b_in]``, the blocks to keep).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" \
                or conv.stride[0] != conv.stride[1] or not isinstance(conv.padding, tuple) \
                or conv.padding[0] != conv.padding[1]:
            raise ValueError("conv: expected groups 1, dilation 1, zero padding and equal stride / padding on "
                             f"both axes, got {conv}")
        c_out, c_in, kh, kw = conv.weight.shape
        matrix = conv.weight.detach().permute(0, 2, 3, 1).reshape(c_out, -1)
        layout = cls._layout_for(matrix, block, density, mask)
        if c_in % layout.block[1]:
            raise ValueError(f"block: b_in = {layout.block[1]} must divide C_in = {c_in}")
        layer = cls(c_in, c_out, (kh, kw), layout, conv.stride[0], conv.padding[0], conv.bias is not None,
                    dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.values.copy_(layout.pack(matrix))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def _weight_of(self, matrix: Tensor) -> Tensor:
        c_out, c_in, kh, kw = self.weight_shape
        return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        values, bias = self._cast(x)
        return block_sparse_conv2d(x.contiguous(memory_format=torch.channels_last), values, self.layout, bias,
                                   stride=self.stride, padding=self.padding, kernel_size=self.weight_shape[2:])

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight_shape
        return (f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                + self._repr_blocks())


class BlockSparseLinear(_BlockSparse):
    """Linear layer ``y = x @ W^T + b`` with ``W [out_features, in_features]`` stored as ``values [nnz, bn, bk]``.

    Input ``[..., in_features]``, output ``[..., out_features]`` in the input's dtype (float16 /
    bfloat16 / float32; under autocast, the autocast dtype); blocks 16, 32, 64 or 128. New values are
    initialised as ``nn.Linear`` initialises its weight.
    """

    def __init__(self, in_features: int, out_features: int, layout: BlockLayout, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.weight_shape = (out_features, in_features)
        self._init_params(layout, bias, device, dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block=32, density: float | None = None,
                   mask: Tensor | None = None) -> "BlockSparseLinear":
        """The block-sparse version of ``linear`` (weight and bias copied, same device and dtype).

        ``block``: int or ``(bn, bk)``. Exactly one of ``density`` (keep that fraction of the blocks, at
        least one, those of largest mean ``|w|``) and ``mask`` (bool ``[out / bn, in / bk]``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        matrix = linear.weight.detach()
        layout = cls._layout_for(matrix, block, density, mask)
        layer = cls(linear.in_features, linear.out_features, layout, linear.bias is not None,
                    dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.values.copy_(layout.pack(matrix.contiguous()))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def _weight_of(self, matrix: Tensor) -> Tensor:
        return matrix

    def forward(self, x: Tensor) -> Tensor:
        values, bias = self._cast(x)
        return block_sparse_linear(x.contiguous(), values, self.layout, bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight_shape
        return f"in_features={in_features}, out_features={out_features}, " + self._repr_blocks()
