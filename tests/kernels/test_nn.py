"""blockdpr_kernels.nn: BlockSparseConv2d / BlockSparseLinear against dense layers with the masked weight."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockdpr_kernels import BlockLayout, BlockSparseConv2d, BlockSparseLinear

CL = torch.channels_last


def _grads(out, dy, *leaves):
    out.backward(dy)
    return [t.grad for t in leaves]


def test_conv_forward_and_gradients_equal_the_dense_conv_with_the_masked_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=True)
    layer = BlockSparseConv2d.from_dense(conv, block=16, density=0.4)
    weight = layer.to_dense().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert weight.shape == conv.weight.shape and 0 < layer.layout.nnz < layer.layout.mask.numel()
    x = torch.randn(2, 32, 7, 7).contiguous(memory_format=CL)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xs)
    y_ref = F.conv2d(xd, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y_ref)
    dx, dv, db = _grads(y, dy, xs, layer.values, layer.bias)
    dx_ref, dw_ref, db_ref = _grads(y_ref, dy, xd, weight, bias)
    torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(db, db_ref, atol=1e-4, rtol=1e-4)
    matrix = dw_ref.permute(0, 2, 3, 1).reshape(48, -1)  # K ordered (kh, kw, C_in)
    torch.testing.assert_close(dv, layer.layout.pack(matrix.contiguous()), atol=1e-4, rtol=1e-4)


def test_linear_forward_and_gradients_equal_the_dense_linear_with_the_masked_weight():
    torch.manual_seed(1)
    linear = nn.Linear(64, 96)
    layer = BlockSparseLinear.from_dense(linear, block=(32, 16), density=0.3)
    weight = layer.to_dense().requires_grad_()
    x = torch.randn(3, 5, 64)
    y = layer(x)
    y_ref = F.linear(x, weight, linear.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    (dv,) = _grads(y, dy, layer.values)
    (dw,) = _grads(y_ref, dy, weight)
    torch.testing.assert_close(dv, layer.layout.pack(dw), atol=1e-4, rtol=1e-4)


def test_from_dense_keeps_the_blocks_of_largest_mean_magnitude():
    linear = nn.Linear(64, 32, bias=False)
    scale = torch.randperm(8, generator=torch.Generator().manual_seed(0)).float() + 1  # one per 16x16 block
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64).sign() * scale.view(2, 1, 4, 1).expand(2, 16, 4, 16).reshape(32, 64))
    layer = BlockSparseLinear.from_dense(linear, block=16, density=0.25)  # 2 of 8 blocks
    assert layer.layout.mask.flatten().tolist() == (scale >= 7).tolist()
    assert layer.bias is None
    torch.testing.assert_close(layer.to_dense(), linear.weight.detach() * (scale >= 7).view(2, 1, 4, 1)
                               .expand(2, 16, 4, 16).reshape(32, 64))
    tiny = BlockSparseLinear.from_dense(linear, block=16, density=0.01)  # never empty
    assert tiny.layout.nnz == 1 and tiny.layout.mask.flatten()[scale.argmax()]


def test_mask_and_set_layout_repack():
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    mask = torch.tensor([[True] * 9, [False] * 8 + [True]])
    layer = BlockSparseConv2d.from_dense(conv, block=16, mask=mask)
    assert torch.equal(layer.layout.mask, mask) and layer.values.shape == (10, 16, 16)
    old = layer.values
    new = BlockLayout(torch.tensor([[True] * 4 + [False] * 5, [True] * 9]), (16, 16))
    values = layer.set_layout(new)
    assert values is layer.values and values is not old and layer.layout is new
    kept = (mask & new.mask).repeat_interleave(16, 0).repeat_interleave(16, 1)
    matrix = layer.to_dense().permute(0, 2, 3, 1).reshape(32, -1)
    original = conv.weight.detach().permute(0, 2, 3, 1).reshape(32, -1)
    torch.testing.assert_close(matrix, original * kept)  # kept blocks keep values, new blocks are zero
    with pytest.raises(ValueError, match="values: expected packed shape"):
        layer.set_layout(new, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="layout: expected shape"):
        layer.set_layout(BlockLayout(torch.ones(2, 2, dtype=torch.bool), (16, 16)))


def test_repr_and_dtype_moves():
    layer = BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1), block=16, density=0.5)
    text = repr(layer)
    assert "32, 32, kernel_size=(3, 3)" in text and "block=(16, 16)" in text and "blocks=18/36" in text
    assert "bias=True" in text and "density 0.500" in text
    assert layer.double().values.dtype == torch.float64 and layer.layout.device == layer.values.device
    assert "in_features=64" in repr(BlockSparseLinear.from_dense(nn.Linear(64, 32), block=32, density=1.0))


BAD = [
    (TypeError, "conv: expected an nn.Conv2d", lambda: BlockSparseConv2d.from_dense(nn.Linear(32, 32), density=0.5)),
    (TypeError, "linear: expected an nn.Linear", lambda: BlockSparseLinear.from_dense(nn.Conv2d(32, 32, 1), density=0.5)),
    (ValueError, "groups 1", lambda: BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 3, groups=2), density=0.5)),
    (ValueError, "exactly one of density and mask", lambda: BlockSparseLinear.from_dense(nn.Linear(32, 32))),
    (ValueError, "exactly one of density and mask",
     lambda: BlockSparseLinear.from_dense(nn.Linear(32, 32), density=0.5, mask=torch.ones(1, 1, dtype=torch.bool))),
    (ValueError, "density: expected a fraction", lambda: BlockSparseLinear.from_dense(nn.Linear(32, 32), density=0.0)),
    (ValueError, "density: expected a fraction", lambda: BlockSparseLinear.from_dense(nn.Linear(32, 32), density=1.5)),
    (ValueError, "mask: expected a bool tensor of the block grid",
     lambda: BlockSparseLinear.from_dense(nn.Linear(64, 32), block=32, mask=torch.ones(2, 2, dtype=torch.bool))),
    (ValueError, "does not tile", lambda: BlockSparseLinear.from_dense(nn.Linear(48, 32), block=32, density=0.5)),
    (ValueError, "b_in = 32 must divide C_in = 16",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(16, 32, 2), block=32, density=0.5)),
    (ValueError, "layout: expected the weight matrix shape",
     lambda: BlockSparseLinear(64, 32, BlockLayout(torch.ones(2, 2, dtype=torch.bool), (32, 16)))),
    (TypeError, "layout: expected a BlockLayout", lambda: BlockSparseLinear(64, 32, "dense")),
]


@pytest.mark.parametrize("exc,match,make", BAD, ids=[m for _, m, _ in BAD])
def test_bad_input_names_the_problem(exc, match, make):
    with pytest.raises(exc, match=match):
        make()


def test_package_imports_only_torch_and_triton():
    code = ("import sys, blockdpr_kernels; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'blockdpr'); "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
