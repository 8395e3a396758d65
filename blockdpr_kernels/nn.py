"""Block-sparse ``nn.Module`` layers: what another project imports.

:class:`BlockSparseConv2d` and :class:`BlockSparseLinear` store only the active ``(bn, bk)`` blocks
of their weight matrix ``W [N, K]`` as one parameter ``values [nnz, bn, bk]`` (its gradient and any
optimizer state have the same packed shape; no dense copy exists) plus a
:class:`~blockdpr_kernels.BlockLayout` (and an optional dense ``bias [N]``). For a conv,
``W = weight.permute(0, 2, 3, 1).reshape(C_out, kh * kw * C_in)``: K is ordered ``(kh, kw, C_in)``, so
a block is a channel tile at one kernel tap.

    layer = BlockSparseConv2d.from_dense(conv, block=32, density=0.1)   # keeps the largest 10% of blocks
    result = sparsify_(model, block=32, density=0.1)                    # every Conv2d / Linear that fits

The layout is part of the ``state_dict`` (key ``block_mask``, the bool block grid): loading a state_dict
rebuilds the layer's layout from it and resizes ``values`` to match, so a freshly built model of any
layout restores the saved structure and values. ``module.to(device)`` moves the layout too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor, nn

from .layout import BlockLayout
from .ops import (BACKENDS, CONV_BLOCKS, CONV_PADDINGS, CONV_STRIDES, LINEAR_BLOCKS, block_sparse_conv2d,
                  block_sparse_linear)

__all__ = ["BlockSparseConv2d", "BlockSparseLinear", "sparsify_", "Sparsified", "MASK_KEY"]

MASK_KEY = "block_mask"  # state_dict entry of the layout: bool [N // bn, K // bk]


def _block_pair(block) -> tuple[int, int]:
    """``(bn, bk)`` from an int or a pair of ints."""
    pair = (block, block) if isinstance(block, int) else tuple(block) if isinstance(block, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
        raise TypeError(f"block: expected an int or a pair of ints, got {block!r}")
    return pair


def _check_blocks(block: tuple[int, int], supported: tuple[int, ...], what: str) -> None:
    if not all(b in supported for b in block):
        raise ValueError(f"block: expected both sides in {supported} for a {what}, got {block}")


def _check_layout_type(layout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _one_int(value) -> int | None:
    """The int of an int or of a pair of equal ints (a conv's stride / padding), else None."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    ok = len(pair) == 2 and pair[0] == pair[1] and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    return pair[0] if ok else None


def _conv_padding(padding, kernel: tuple[int, int], stride: int) -> int:
    """One int padding from an int, an equal pair, ``"valid"`` or ``"same"`` (odd kernels, stride 1)."""
    if padding == "valid":
        return 0
    if padding == "same":
        if stride != 1 or kernel[0] != kernel[1] or kernel[0] % 2 == 0 or (kernel[0] - 1) // 2 not in CONV_PADDINGS:
            raise ValueError(f"padding='same': supported for square odd kernels whose half width is in "
                             f"{CONV_PADDINGS} (1x1, 3x3) at stride 1, got kernel {kernel} at stride {stride}")
        return (kernel[0] - 1) // 2
    if _one_int(padding) not in CONV_PADDINGS:
        raise ValueError(f"padding: expected {' or '.join(map(str, CONV_PADDINGS))} on both axes, 'valid', or "
                         f"'same' (1x1 / 3x3 kernels at stride 1), got {padding!r}")
    return _one_int(padding)


def _conv_stride(stride) -> int:
    if _one_int(stride) not in CONV_STRIDES:
        raise ValueError(f"stride: expected {' or '.join(map(str, CONV_STRIDES))} on both axes, got {stride!r}")
    return _one_int(stride)


def _check_tiles(block: tuple[int, int], n: int, k: int, n_name: str, k_name: str, what: str) -> None:
    """Raise naming the dimension(s) a block side does not divide."""
    bad = [f"{name} = {size} is not a multiple of {side} = {b}"
           for name, size, side, b in ((k_name, k, "b_in", block[1]), (n_name, n, "b_out", block[0])) if size % b]
    if bad:
        raise ValueError(f"block {block} does not tile {what}: {' and '.join(bad)}; keep this layer dense "
                         "(sparsify_ leaves such layers dense and lists them)")


def _conv_geometry(c_in: int, c_out: int, kernel: tuple[int, int], stride, padding, block) -> tuple[int, int]:
    """``(stride, padding)`` as the kernels take them, after checking every rule of a block-sparse conv."""
    stride = _conv_stride(stride)
    padding = _conv_padding(padding, kernel, stride)
    _check_blocks(block, CONV_BLOCKS, "conv")
    _check_tiles(block, c_out, c_in, "C_out", "C_in",
                 f"conv {c_in}->{c_out} {kernel[0]}x{kernel[1]} (a block is a channel tile at one kernel tap)")
    return stride, padding


def _check_conv_module(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("conv: expected groups 1, dilation 1 and padding_mode 'zeros', got "
                         f"groups {conv.groups}, dilation {tuple(conv.dilation)}, padding_mode {conv.padding_mode!r}")


class _BlockSparse(nn.Module):
    """Packed ``values`` + layout + optional bias, shared by the conv and linear layers.

    Subclasses set ``weight_shape`` (the dense weight's shape), then call :meth:`_init_params`, and
    implement :meth:`_weight_of` (``W [N, K]`` -> dense weight) and ``forward``.
    """

    weight_shape: tuple[int, ...]

    def _init_params(self, layout: BlockLayout, bias: bool, device, dtype, backend: str) -> None:
        n, k = self.matrix_shape
        if layout.shape != (n, k):
            raise ValueError(f"layout: expected the weight matrix shape {(n, k)}, got {layout.shape}")
        device = layout.device if device is None else torch.device(device)
        if device != layout.device:
            raise ValueError(f"device: expected the layout's device {layout.device}, got {device}")
        self.backend = _check_backend(backend)
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

    @property
    def values(self) -> Tensor:
        """The packed values of this layer's blocks ``[nnz, bn, bk]``: its Parameter, or, when it shares a
        :class:`~blockdpr_kernels.PackedStorage`, the view of its rows of the storage's values."""
        params = self.__dict__.get("_parameters", {})
        if "values" in params:
            return params["values"]
        if "packed" in params:
            return params["packed"].narrow(0, self.layout.offset, self.layout.nnz)
        raise AttributeError("values")

    def _op_values(self) -> Tensor:
        """What the ops take: ``values``, or the whole shared storage (its layout indexes its rows)."""
        return self._parameters["packed"] if self.layout.shared else self._parameters["values"]

    def _share(self, packed: nn.Parameter, layout: BlockLayout) -> None:
        """Use rows of ``packed`` (a :class:`~blockdpr_kernels.PackedStorage`'s values) through the shared
        ``layout``: ``values`` becomes a view, ``packed`` the registered Parameter."""
        self._parameters.pop("values", None)
        self._parameters["packed"] = packed
        self.layout = layout

    def set_layout(self, layout: BlockLayout, values: Tensor | None = None) -> nn.Parameter:
        """Install ``layout`` with a new ``values`` Parameter, which is returned (an optimizer holding the
        old one must be told). ``values [layout.nnz, bn, bk]`` when given (e.g. survivors plus zeros after
        a reallocation); else repacked from the current weight: blocks kept keep their values, new
        blocks start at zero."""
        _check_layout_type(layout)
        if self.layout.shared:
            raise ValueError("set_layout: this layer shares a PackedStorage; change its structure there (update_)")
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

    # ------------------------------------------------------------------ state_dict: the layout travels with the values
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if destination.pop(prefix + "packed", None) is not None:  # shared storage: this layer's rows only
            destination[prefix + "values"] = self.values if keep_vars else self.values.detach()
        destination[prefix + MASK_KEY] = self.layout.mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Rebuild the layout from ``block_mask`` (resizing ``values``, the same Parameter object), then load
        the tensors as usual. A mask of another block grid and values that do not fit the mask are errors;
        a missing mask is a missing key (an error under ``strict=True``; with ``strict=False`` the layer
        keeps its layout and the values load into it when their shape fits: the caller vouches for them)."""
        key = prefix + MASK_KEY
        mask = state_dict.get(key)
        if self.layout.shared:
            self._load_shared(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return
        if mask is None:
            missing_keys.append(key)
        elif not self._load_layout(mask, state_dict.get(prefix + "values"), key, error_msgs):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _forget(unexpected_keys, key)

    def _load_shared(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Load into a layer sharing a PackedStorage: the saved mask must be its structure (blocks move
        between the storage's layers only together: install the structure first, e.g. through
        ``DPR.load_state_dict``), then its values are copied into its rows."""
        key, values_key = prefix + MASK_KEY, prefix + "values"
        mask, values = state_dict.get(key), state_dict.get(values_key)
        if mask is None or values is None:
            missing_keys.extend(k for k, v in ((key, mask), (values_key, values)) if v is None)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != self.layout.grid \
                or not torch.equal(mask.to(self.layout.device), self.layout.mask):
            error_msgs.append(f"{key}: this layer shares a PackedStorage and its structure differs from the saved "
                              "one; install the saved structure first (DPR.load_state_dict / "
                              "BlockSparsity.load_state_dict), then load the values")
            return
        elif not isinstance(values, Tensor) or tuple(values.shape) != tuple(self.values.shape):
            error_msgs.append(f"{values_key}: expected shape {list(self.values.shape)} (the layer's blocks), got "
                              f"{list(getattr(values, 'shape', []))}")
            return
        else:
            with torch.no_grad():
                self.values.copy_(values)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _forget(missing_keys, prefix + "packed")
        _forget(unexpected_keys, key, values_key)

    def _load_layout(self, mask, values, key: str, error_msgs: list) -> bool:
        """Install the layout of a loaded ``mask`` (False, with an error message, if it does not fit)."""
        grid, block = self.layout.grid, self.layout.block
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != grid:
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            error_msgs.append(f"{key}: expected a bool block mask of the block grid {list(grid)} (block {block} "
                              f"over the weight matrix {list(self.layout.shape)}), got {got}: a layer of "
                              "another shape or block size")
            return False
        nnz = int(mask.sum())
        if isinstance(values, Tensor) and tuple(values.shape) != (nnz, *block):
            error_msgs.append(f"{key}: holds {nnz} blocks, but the values beside it have shape "
                              f"{list(values.shape)}, not {[nnz, *block]}")
            return False
        mask = mask.to(self.values.device)
        if not torch.equal(mask, self.layout.mask):
            self.layout = BlockLayout(mask, block)
            self.values.data = self.values.data.new_empty(nnz, *block)
        return True

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / ``.half()``: the parameters, then the layout to their device."""
        if self.layout.shared and fn(self.layout.row_ptr.new_empty(0, dtype=torch.float32)).device != self.layout.device:
            raise ValueError("to: this layer shares a PackedStorage, which cannot move layer by layer: move the "
                             "model before its layers share one")
        out = super()._apply(fn, *args, **kwargs)
        if self.values.device != self.layout.device:
            self.layout = self.layout.to(self.values.device)
        return out

    def _cast(self, x: Tensor):
        """(values, bias) in ``x``'s dtype, unless autocast is on (the op then casts to its dtype)."""
        values = self._op_values()
        if torch.is_autocast_enabled(x.device.type):
            return values, self.bias
        return values.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)

    def _repr_blocks(self) -> str:
        total = self.layout.grid[0] * self.layout.grid[1]
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return (f"bias={self.bias is not None}, block={self.layout.block}, "
                f"blocks={self.layout.nnz}/{total} (density {self.layout.nnz / max(1, total):.3f})" + backend)

    @classmethod
    def _layout_for(cls, matrix: Tensor, block: tuple[int, int], density, mask) -> BlockLayout:
        """The layout ``from_dense`` keeps: ``mask``, or the blocks of largest mean ``|w|`` at ``density``
        (``block`` already checked to tile ``matrix``)."""
        bn, bk = block
        n, k = matrix.shape
        if (density is None) == (mask is None):
            raise ValueError("from_dense: pass exactly one of density and mask")
        grid = (n // bn, k // bk)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != grid:
                raise ValueError(f"mask: expected a bool tensor of the block grid {list(grid)}, got "
                                 f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__} "
                                 f"{list(getattr(mask, 'shape', []))}")
            return BlockLayout(mask.to(matrix.device), (bn, bk))
        _check_density(density)
        scores = matrix.detach().abs().float().reshape(grid[0], bn, grid[1], bk).mean(dim=(1, 3)).flatten()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.topk(max(1, round(density * scores.numel()))).indices] = True
        return BlockLayout(keep.view(grid), (bn, bk))


def _forget(keys: list, *names: str) -> None:
    """Remove ``names`` from a load_state_dict key list (keys this layer handles itself)."""
    keys[:] = [k for k in keys if k not in names]


def _check_density(density) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}")


class BlockSparseConv2d(_BlockSparse):
    """Conv2d with a block-sparse weight ``[C_out, C_in, kh, kw]`` stored as ``values [nnz, b_out, b_in]``.

    Input ``[B, C_in, H, W]`` (channels_last avoids a copy), output ``[B, C_out, P, Q]`` channels_last,
    in the input's dtype (float16 / bfloat16 / float32; under autocast, the autocast dtype). Stride 1 or
    2; padding 0, 1, ``"valid"`` or ``"same"`` (1x1 and 3x3 kernels at stride 1); no dilation or groups;
    ``b_out`` divides ``C_out`` and ``b_in`` divides ``C_in`` (16, 32 or 64). ``backend`` ("auto",
    "triton", "reference") is passed to :func:`~blockdpr_kernels.block_sparse_conv2d`. New values are
    initialised as ``nn.Conv2d`` initialises its weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, layout: BlockLayout, stride=1,
                 padding=0, bias: bool = False, device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight_shape = (out_channels, in_channels, kh, kw)
        _check_layout_type(layout)
        self.stride, self.padding = _conv_geometry(in_channels, out_channels, (kh, kw), stride, padding,
                                                   layout.block)
        self._init_params(layout, bias, device, dtype, backend)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block=32, density: float | None = None,
                   mask: Tensor | None = None, backend: str = "auto") -> "BlockSparseConv2d":
        """The block-sparse version of ``conv`` (its weight and bias copied, same device and dtype).

        ``block``: int or ``(b_out, b_in)``, each in ``CONV_BLOCKS``. Exactly one of ``density`` (keep that
        fraction of the blocks, at least one, those of largest mean ``|w|``) and ``mask`` (bool
        ``[C_out / b_out, kh * kw * C_in / b_in]``, the blocks to keep). Every rule (block, stride,
        padding, channels) is checked first: a ``ValueError`` names the one broken.
        """
        _check_conv_module(conv)
        block = _block_pair(block)
        c_out, c_in, kh, kw = conv.weight.shape
        stride, padding = _conv_geometry(c_in, c_out, (kh, kw), conv.stride, conv.padding, block)
        matrix = conv.weight.detach().permute(0, 2, 3, 1).reshape(c_out, -1)
        layout = cls._layout_for(matrix, block, density, mask)
        layer = cls(c_in, c_out, (kh, kw), layout, stride, padding, conv.bias is not None,
                    dtype=conv.weight.dtype, backend=backend)
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
                                   stride=self.stride, padding=self.padding, kernel_size=self.weight_shape[2:],
                                   backend=self.backend)

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight_shape
        return (f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                + self._repr_blocks())


class BlockSparseLinear(_BlockSparse):
    """Linear layer ``y = x @ W^T + b`` with ``W [out_features, in_features]`` stored as ``values [nnz, bn, bk]``.

    Input ``[..., in_features]``, output ``[..., out_features]`` in the input's dtype (float16 /
    bfloat16 / float32; under autocast, the autocast dtype); blocks 16, 32, 64 or 128. ``backend`` is
    passed to :func:`~blockdpr_kernels.block_sparse_linear`. New values are initialised as ``nn.Linear``
    initialises its weight.
    """

    def __init__(self, in_features: int, out_features: int, layout: BlockLayout, bias: bool = True,
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        self.weight_shape = (out_features, in_features)
        _check_layout_type(layout)
        _check_blocks(layout.block, LINEAR_BLOCKS, "linear")
        self._init_params(layout, bias, device, dtype, backend)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block=32, density: float | None = None,
                   mask: Tensor | None = None, backend: str = "auto") -> "BlockSparseLinear":
        """The block-sparse version of ``linear`` (weight and bias copied, same device and dtype).

        ``block``: int or ``(bn, bk)``, each in ``LINEAR_BLOCKS``. Exactly one of ``density`` (keep that
        fraction of the blocks, at least one, those of largest mean ``|w|``) and ``mask`` (bool
        ``[out / bn, in / bk]``). Block and shapes are checked first.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        block = _linear_geometry(linear.in_features, linear.out_features, block)
        matrix = linear.weight.detach()
        layout = cls._layout_for(matrix, block, density, mask)
        layer = cls(linear.in_features, linear.out_features, layout, linear.bias is not None,
                    dtype=linear.weight.dtype, backend=backend)
        with torch.no_grad():
            layer.values.copy_(layout.pack(matrix.contiguous()))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def _weight_of(self, matrix: Tensor) -> Tensor:
        return matrix

    def forward(self, x: Tensor) -> Tensor:
        values, bias = self._cast(x)
        return block_sparse_linear(x.contiguous(), values, self.layout, bias, backend=self.backend)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight_shape
        return f"in_features={in_features}, out_features={out_features}, " + self._repr_blocks()


def _linear_geometry(in_features: int, out_features: int, block) -> tuple[int, int]:
    block = _block_pair(block)
    _check_blocks(block, LINEAR_BLOCKS, "linear")
    _check_tiles(block, out_features, in_features, "out_features", "in_features",
                 f"the weight matrix [{out_features}, {in_features}]")
    return block


# ----------------------------------------------------------------------------- whole-model conversion

@dataclasses.dataclass(frozen=True)
class Sparsified:
    """What :func:`sparsify_` did: ``sparse``, the names of the layers it replaced (in module order);
    ``dense``, name -> why each layer the filter passed stays dense (its block does not tile it, or a
    stride / padding / groups the kernels do not run)."""
    sparse: tuple[str, ...]
    dense: dict[str, str]


def sparsify_(model: nn.Module, block=32, density: float = 0.1, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, backend: str = "auto") -> Sparsified:
    """Replace, in place, every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` that ``filter_fn(module, name)``
    accepts (all when None) by its block-sparse version (``from_dense(module, block, density=density)``:
    the blocks of largest mean ``|w|``). A layer the kernels cannot run at ``block`` (e.g. a stem with 3
    input channels) stays dense and is listed, with the reason, in the returned :class:`Sparsified`.
    ``block`` and ``density`` are checked first, for every layer kind present."""
    if not isinstance(model, nn.Module) or isinstance(model, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"model: expected a module holding Conv2d / Linear layers, got {type(model).__name__} "
                        "(convert a single layer with BlockSparseConv2d / BlockSparseLinear.from_dense)")
    pair = _block_pair(block)
    _check_density(density)
    _check_backend(backend)
    kinds = {type(m) for m in model.modules()}
    if any(issubclass(t, nn.Conv2d) for t in kinds):
        _check_blocks(pair, CONV_BLOCKS, "conv")
    if any(issubclass(t, nn.Linear) for t in kinds):
        _check_blocks(pair, LINEAR_BLOCKS, "linear")
    replaced: dict[int, nn.Module] = {}
    sparse, dense = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        try:
            if isinstance(module, nn.Conv2d):
                replaced[id(module)] = BlockSparseConv2d.from_dense(module, pair, density=density, backend=backend)
            else:
                replaced[id(module)] = BlockSparseLinear.from_dense(module, pair, density=density, backend=backend)
            sparse.append(name)
        except ValueError as e:
            dense[name] = str(e)
    for parent in list(model.modules()):  # every reference, also to a layer shared by two parents
        for attr, child in list(parent._modules.items()):  # named_children() would skip a repeated child
            if id(child) in replaced:
                setattr(parent, attr, replaced[id(child)])
    return Sparsified(tuple(sparse), dense)
