"""DenseGradCapture: the dense weight gradient of block-sparse layers at update steps only."""
import pytest
import torch
from torch import nn

from blockdpr.sparsity.blocks import weight_to_matrix
from blockdpr.sparsity.dense_grad import DenseGradCapture
from blockdpr_kernels.nn import BlockSparseConv2d, BlockSparseLinear
from blockdpr_kernels.testing import record_work


def _model(seed=0):
    torch.manual_seed(seed)
    conv = BlockSparseConv2d.from_dense(nn.Conv2d(32, 16, 3, stride=2, padding=1), block=16, density=0.5)
    lin = BlockSparseLinear.from_dense(nn.Linear(64, 32), block=16, density=0.25)
    return conv, lin


def _step(conv, lin, x):
    for p in (*conv.parameters(), *lin.parameters()):
        p.grad = None
    h = conv(x)                            # [B, 16, 4, 4]
    y = lin(h.flatten(2).transpose(1, 2).reshape(-1, 16).repeat(1, 4))  # [B*16, 64] -> [B*16, 32]
    y.square().sum().backward()


def test_capture_equals_the_dense_layers_weight_gradient():
    conv, lin = _model()
    x = torch.randn(3, 32, 8, 8)
    with DenseGradCapture({"conv": conv, "lin": lin}) as capture:
        _step(conv, lin, x)
    got = capture.matrices()
    # the same step through dense layers holding the same (block-masked) weights
    dconv = nn.Conv2d(32, 16, 3, stride=2, padding=1)
    dlin = nn.Linear(64, 32)
    with torch.no_grad():
        dconv.weight.copy_(conv.to_dense()), dconv.bias.copy_(conv.bias)
        dlin.weight.copy_(lin.to_dense()), dlin.bias.copy_(lin.bias)
    h = dconv(x)
    dlin(h.flatten(2).transpose(1, 2).reshape(-1, 16).repeat(1, 4)).square().sum().backward()
    torch.testing.assert_close(got["conv"], weight_to_matrix(dconv.weight.grad), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["lin"], dlin.weight.grad, rtol=1e-4, atol=1e-4)
    assert got["conv"].shape == (16, 9 * 32)
    # the gradient of inactive blocks is there too (what RigL grows by)
    inactive = ~conv.layout.mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert got["conv"][inactive].abs().sum() > 0


def test_ordinary_steps_do_no_dense_work():
    conv, lin = _model()
    x = torch.randn(2, 32, 8, 8)
    with record_work() as before:
        _step(conv, lin, x)
    with record_work() as update:
        with DenseGradCapture({"conv": conv, "lin": lin}) as capture:
            _step(conv, lin, x)
        capture.matrices()
    assert not conv._forward_hooks and not lin._forward_hooks
    with record_work() as after:
        _step(conv, lin, x)
    assert after.ops == before.ops  # nothing left behind by the update step
    dense = update.ops - before.ops  # what the update step adds: the dense gradients
    assert dense["aten.convolution_backward"] >= 1 and dense["aten.mm"] >= 1


def test_capture_without_backward_and_wrong_layers_are_named_errors():
    conv, _ = _model()
    with DenseGradCapture({"conv": conv}) as capture:
        conv(torch.randn(1, 32, 8, 8))
    with pytest.raises(RuntimeError, match="conv: no gradient"):
        capture.matrices()
    with pytest.raises(TypeError, match="dense: expected a BlockSparseConv2d"):
        DenseGradCapture({"dense": nn.Conv2d(3, 3, 3)})
