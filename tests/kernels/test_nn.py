"""blockdpr_kernels.nn: BlockSparseConv2d / BlockSparseLinear against dense layers with the masked weight."""
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockdpr_kernels import BlockLayout, BlockSparseConv2d, BlockSparseLinear
from blockdpr_kernels.nn import Sparsified, sparsify_
from blockdpr_kernels.testing import SKIP_REASON, kernel_device, record_autotune_keys

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
    (ValueError, "does not tile the weight matrix \\[32, 48\\]: in_features = 48 is not a multiple of b_in = 32",
     lambda: BlockSparseLinear.from_dense(nn.Linear(48, 32), block=32, density=0.5)),
    (ValueError, "C_in = 16 is not a multiple of b_in = 32",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(16, 32, 2), block=32, density=0.5)),
    # a dense stem: named by its channels (not by the im2col matrix [16, 27]), with the way out
    (ValueError, "C_in = 3 is not a multiple of b_in = 32 and C_out = 16 is not a multiple of b_out = 32; keep this "
                 "layer dense", lambda: BlockSparseConv2d.from_dense(nn.Conv2d(3, 16, 3), block=32, density=0.5)),
    # checked before anything is built (these used to pass until the first forward)
    (ValueError, r"block: expected both sides in \(16, 32, 64\) for a conv, got \(48, 48\)",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(96, 96, 3), block=48, density=0.5)),
    (ValueError, r"block: expected both sides in \(16, 32, 64, 128\) for a linear, got \(32, 8\)",
     lambda: BlockSparseLinear.from_dense(nn.Linear(64, 64), block=(32, 8), density=0.5)),
    (ValueError, "stride: expected 1 or 2 on both axes, got \\(3, 3\\)",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 3, stride=3), density=0.5)),
    (ValueError, "stride: expected 1 or 2", lambda: BlockSparseConv2d(32, 32, 3, _layout(32, 288), stride=3)),
    (ValueError, "stride: expected 1 or 2 on both axes, got 1.5",
     lambda: BlockSparseConv2d(32, 32, 3, _layout(32, 288), stride=1.5)),
    (ValueError, r"padding: expected 0 or 1 on both axes, 'valid', or 'same' \(1x1 / 3x3 kernels at stride 1\), "
                 r"got \(1, 0\)", lambda: BlockSparseConv2d(32, 32, 3, _layout(32, 288), padding=(1, 0))),
    (ValueError, "padding: expected 0 or 1 on both axes",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 5, padding=2), density=0.5)),
    (ValueError, r"padding='same': supported for square odd kernels whose half width is in \(0, 1\) \(1x1, 3x3\) "
                 r"at stride 1, got kernel \(5, 5\)",
     lambda: BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 5, padding="same"), density=0.5)),
    (ValueError, "dilation 1", lambda: BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 3, dilation=2), density=0.5)),
    (ValueError, "backend: expected one of", lambda: BlockSparseLinear(64, 32, _layout(32, 64), backend="cuda")),
    (TypeError, "block: expected an int or a pair", lambda: BlockSparseLinear.from_dense(nn.Linear(32, 32), "32", 0.5)),
    (ValueError, "layout: expected the weight matrix shape",
     lambda: BlockSparseLinear(64, 32, BlockLayout(torch.ones(2, 2, dtype=torch.bool), (32, 16)))),
    (TypeError, "layout: expected a BlockLayout", lambda: BlockSparseLinear(64, 32, "dense")),
]


def _layout(n, k, block=32, density=0.5, seed=0):
    return BlockLayout.random((n, k), (block, block), density, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exc,match,make", BAD, ids=[m for _, m, _ in BAD])
def test_bad_input_names_the_problem(exc, match, make):
    with pytest.raises(exc, match=match):
        make()


def test_package_imports_only_torch_and_triton():
    code = ("import sys, blockdpr_kernels; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'blockdpr'); "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- the layout in the state_dict

class _Net(nn.Module):
    """A conv and a linear layer of given layouts (random, of the given density and seed)."""

    def __init__(self, density, seed, block=16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = BlockSparseConv2d(32, 32, 3, BlockLayout.random((32, 288), (block, block), density, generator=g),
                                      padding=1, bias=True)
        self.fc = BlockSparseLinear(32, 64, BlockLayout.random((64, 32), (block, block), density, generator=g))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _saved(module) -> dict:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("density", [0.5, 0.25], ids=["same block count", "another block count"])
def test_state_dict_restores_structure_and_values_into_a_model_of_another_layout(density):
    torch.manual_seed(0)
    saved = _Net(0.5, seed=1)
    state = _saved(saved)
    assert state["conv.block_mask"].dtype == torch.bool and state["conv.block_mask"].shape == (2, 18)
    assert torch.equal(state["fc.block_mask"], saved.fc.layout.mask)
    fresh = _Net(density, seed=2)
    assert not torch.equal(fresh.conv.layout.mask, saved.conv.layout.mask)
    values = fresh.conv.values
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.conv.values is values, "the same Parameter object, resized: an optimizer built before keeps it"
    for name in ("conv", "fc"):
        a, b = getattr(saved, name), getattr(fresh, name)
        assert torch.equal(a.layout.mask, b.layout.mask) and a.layout.nnz == b.layout.nnz
        assert torch.equal(a.layout.col_idx, b.layout.col_idx) and torch.equal(a.to_dense(), b.to_dense())
    x = torch.randn(2, 32, 5, 5).contiguous(memory_format=CL)
    torch.testing.assert_close(fresh(x), saved(x), atol=0, rtol=0)


def test_loading_another_block_grid_or_values_that_do_not_fit_the_mask_fails_naming_it():
    state = _saved(_Net(0.5, seed=1, block=16))
    with pytest.raises(RuntimeError, match=r"conv.block_mask: expected a bool block mask of the block grid \[1, 9\] "
                                           r"\(block \(32, 32\) over the weight matrix \[32, 288\]\), got torch.bool "
                                           r"\[2, 18\]"):
        _Net(0.5, seed=1, block=32).load_state_dict(state)
    bad = dict(state)
    bad["fc.values"] = bad["fc.values"][:-1]
    with pytest.raises(RuntimeError, match=r"fc.block_mask: holds \d+ blocks, but the values beside it"):
        _Net(0.5, seed=1).load_state_dict(bad)


def test_values_without_their_mask_are_refused_when_strict_and_reported_missing_otherwise():
    state = _saved(_Net(0.5, seed=1))
    del state["conv.block_mask"]
    fresh = _Net(0.5, seed=2)  # the same block count: the values alone would load into other blocks
    assert fresh.conv.values.shape == state["conv.values"].shape
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"conv.block_mask\""):
        fresh.load_state_dict(state)
    mask = fresh.conv.layout.mask
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["conv.block_mask"] and torch.equal(fresh.conv.layout.mask, mask)


def test_state_dict_keeps_the_layout_after_set_layout():
    layer = BlockSparseLinear.from_dense(nn.Linear(64, 32), block=16, density=0.5)
    layer.set_layout(BlockLayout(torch.ones(2, 4, dtype=torch.bool), (16, 16)))
    assert layer.state_dict()["block_mask"].all()


# ----------------------------------------------------------------------------- backend, padding="same", sparsify_

@pytest.mark.skipif(kernel_device() is None, reason=SKIP_REASON)
def test_layers_pass_their_backend_to_the_ops():
    device = kernel_device()
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).to(device)
    x = torch.randn(1, 16, 4, 4, device=device).contiguous(memory_format=CL)
    for backend, launches in (("triton", 1), ("reference", 0)):
        layer = BlockSparseConv2d.from_dense(conv, block=16, density=0.5, backend=backend)
        assert layer.backend == backend and f"backend='{backend}'" in repr(layer)
        with record_autotune_keys() as seen:
            y = layer(x)
        assert len(seen) == launches
        torch.testing.assert_close(y, F.conv2d(x, layer.to_dense(), layer.bias, padding=1), atol=1e-4, rtol=1e-4)
    linear = BlockSparseLinear.from_dense(nn.Linear(32, 16).to(device), block=16, density=0.5, backend="triton")
    with record_autotune_keys() as seen:
        linear(torch.randn(4, 32, device=device))
    assert seen


@pytest.mark.parametrize("kernel", [1, 3])
def test_padding_same_for_odd_kernels_at_stride_1(kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, kernel, padding="same")
    layer = BlockSparseConv2d.from_dense(conv, block=16, density=0.5)
    assert layer.padding == (kernel - 1) // 2
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.to_dense(), conv.bias, padding="same"),
                               atol=1e-5, rtol=1e-5)
    assert BlockSparseConv2d(16, 32, kernel, layer.layout, padding="same").padding == layer.padding


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)              # 3 input channels: stays dense
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1))
        self.pool = nn.Conv2d(64, 64, 3, stride=2, dilation=2)  # dilation: stays dense
        self.head = nn.Linear(64, 10)                           # 10 outputs: stays dense

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).mean(dim=(2, 3)))


def test_sparsify_replaces_what_fits_in_place_and_lists_what_stays_dense():
    torch.manual_seed(0)
    model = _Classifier()
    dense_body = model.body[0]
    result = sparsify_(model, block=32, density=0.5, filter_fn=lambda module, name: name != "body.2")
    assert isinstance(result, Sparsified) and result.sparse == ("body.0",)
    assert set(result.dense) == {"stem", "pool", "head"}
    assert "C_in = 3 is not a multiple of b_in = 32" in result.dense["stem"]
    assert "dilation" in result.dense["pool"] and "out_features = 10 is not a multiple of b_out = 32" in result.dense["head"]
    assert isinstance(model.body[0], BlockSparseConv2d) and type(model.body[2]) is nn.Conv2d  # filtered out
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert model.body[0].layout.nnz == 9 and model.body[0].padding == 1
    masked = nn.Conv2d(32, 64, 3, padding=1)
    with torch.no_grad():
        masked.weight.copy_(model.body[0].to_dense())
        masked.bias.copy_(dense_body.bias)
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=CL)
    torch.testing.assert_close(model.body[0](x), masked(x), atol=1e-5, rtol=1e-5)
    model(torch.randn(2, 3, 8, 8))  # still runs end to end


def test_sparsify_replaces_a_shared_layer_everywhere_and_checks_its_arguments_first():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert sparsify_(model, block=16, density=0.5, backend="reference").sparse == ("0",)
    assert model[0] is model[2] and isinstance(model[0], BlockSparseLinear) and model[0].backend == "reference"
    with pytest.raises(ValueError, match="block: expected both sides in .* for a conv"):
        sparsify_(_Classifier(), block=128, density=0.5)  # fine for the linear, not for the convs
    with pytest.raises(ValueError, match="density"):
        sparsify_(_Classifier(), block=32, density=0)
    with pytest.raises(TypeError, match="model: expected a module holding"):
        sparsify_(nn.Linear(32, 32), block=32, density=0.5)
