"""The dense weight gradient of block-sparse layers, only at the steps that need it (RigL's growth).

A block-sparse layer's backward computes the gradient of its active blocks only. RigL grows the
inactive blocks of largest gradient magnitude, so at an update step it needs ``dL/dW`` of the
whole weight. :class:`DenseGradCapture` is entered around that one step's forward and backward:
its hooks keep each layer's input and output gradient, and :meth:`DenseGradCapture.matrices`
turns them into the dense gradient matrix ``[N, K]`` of each layer (``torch.nn.grad.conv2d_weight``
for a conv, ``dy^T x`` for a linear), in the weight <-> matrix convention of
:mod:`blockdpr.sparsity.blocks`. Outside the context no hook is registered, so ordinary steps do
no dense work at all.
"""

from __future__ import annotations

import torch
from torch import nn

from blockdpr_kernels.nn import BlockSparseConv2d, BlockSparseLinear

from .blocks import weight_to_matrix


class DenseGradCapture:
    """``with DenseGradCapture(layers) as capture: loss.backward()`` then ``capture.matrices()``.

    layers: ``{name: BlockSparseConv2d | BlockSparseLinear}``. A layer called more than once in the
    step contributes the sum over its calls, as autograd's weight gradient would.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        for name, layer in layers.items():
            if not isinstance(layer, (BlockSparseConv2d, BlockSparseLinear)):
                raise TypeError(f"{name}: expected a BlockSparseConv2d or BlockSparseLinear, got "
                                f"{type(layer).__name__}")
        self.layers = dict(layers)
        self._saved: dict[str, list[list[torch.Tensor]]] = {}
        self._handles: list = []

    def __enter__(self) -> "DenseGradCapture":
        self._saved = {name: [] for name in self.layers}
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def save(module, inputs, output):
            call = [inputs[0].detach()]
            self._saved[name].append(call)
            if output.requires_grad:
                output.register_hook(lambda dy: call.append(dy.detach()))
        return save

    @torch.no_grad()
    def matrices(self) -> dict[str, torch.Tensor]:
        """``{name: dL/dW as the matrix [N, K]}`` (fp32) from the calls whose gradient arrived."""
        out = {}
        for name, layer in self.layers.items():
            grads = [_weight_grad(layer, *call) for call in self._saved[name] if len(call) == 2]
            if not grads:
                raise RuntimeError(f"{name}: no gradient reached this layer inside the capture "
                                   "(run the forward and backward of the step inside it)")
            out[name] = weight_to_matrix(torch.stack(grads).sum(0))
        return out


def _weight_grad(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dense dL/dW in the layer's weight shape, fp32."""
    if isinstance(layer, BlockSparseConv2d):
        return torch.nn.grad.conv2d_weight(x.float(), layer.weight_shape, dy.float(), stride=layer.stride,
                                           padding=layer.padding)
    return dy.reshape(-1, dy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
