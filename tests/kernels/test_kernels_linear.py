"""Block-sparse linear: Triton kernels (interpreter on CPU) against the plain-torch reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blockdpr_kernels import BlockLayout, block_sparse_linear
from blockdpr_kernels import conv as _conv
from blockdpr_kernels.testing import BF16_SKIP_REASON, SKIP_REASON, kernel_device

DEVICE = kernel_device()  # cuda, or cpu under TRITON_INTERPRET=1 (tests/conftest.py)
if DEVICE is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

BF16_SKIP = pytest.mark.skipif(_conv.INTERPRET, reason=BF16_SKIP_REASON)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def run_linear(x, values, layout, bias, dy, backend):
    """Output and (dx, dvalues, dbias) of the op with the given backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, values) + ((bias,) if bias is not None else ())]
    y = block_sparse_linear(leaves[0], leaves[1], layout, leaves[2] if bias is not None else None,
                            backend=backend)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def check_linear(mask, block, lead, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = BlockLayout(mask.to(DEVICE), block)
    n, k = layout.shape
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    values = torch.randn(layout.nnz, *block, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if with_bias else None
    dy = torch.randn(*lead, n, generator=g).to(DEVICE, dtype)
    y, grads = run_linear(x, values, layout, bias, dy, "triton")
    y_ref, grads_ref = run_linear(x, values, layout, bias, dy, "reference")
    assert y.dtype == dtype and y.shape == (*lead, n)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, want, name in zip(grads, grads_ref, ("dx", "dvalues", "dbias")):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@st.composite
def linear_cases(draw):
    block = (draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32])))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    bits = draw(st.lists(st.booleans(), min_size=grid[0] * grid[1], max_size=grid[0] * grid[1]))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(grid)
    lead = tuple(draw(st.lists(st.integers(1, 13), min_size=1, max_size=2)))
    return mask, block, lead, draw(st.sampled_from([torch.float32, torch.float16])), draw(st.booleans())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(linear_cases())
def test_linear_random(case):
    check_linear(*case)


@pytest.mark.parametrize("kind", ["empty", "dense", "single", "empty_row_col"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_special_layouts(kind, dtype):
    mask = torch.zeros(3, 4, dtype=torch.bool)
    if kind == "dense":
        mask[:] = True
    elif kind == "single":
        mask[1, 2] = True
    elif kind == "empty_row_col":
        mask[:] = True
        mask[1, :] = False
        mask[:, 2] = False
    check_linear(mask, (16, 16), (37,), dtype, with_bias=True)


@pytest.mark.parametrize("block", [(128, 16), (16, 128), (128, 128)])
def test_linear_large_blocks(block):
    check_linear(torch.tensor([[True, False], [True, True]]), block, (33,), torch.float32, True)


def test_linear_long_m():
    """Many M tiles, and several weight-gradient splits (under the interpreter: 4 splits here)."""
    check_linear(torch.tensor([[True, False, False], [False, False, True]]), (16, 16), (300,), torch.float16, True)


@BF16_SKIP
def test_linear_bf16():
    check_linear(torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) < 0.5, (32, 32), (77,),
                 torch.bfloat16, True)


def test_linear_gradcheck_reference_fp64():
    layout = BlockLayout(torch.tensor([[True, False], [True, True]]), (16, 16))
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(layout.nnz, 16, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: block_sparse_linear(x, v, layout, b, backend="reference"), (x, v, b), fast_mode=True)


def test_linear_auto_on_cpu_matches_dense():
    """CPU tensors with backend='auto' use the reference path: equal to the dense op."""
    layout = BlockLayout(torch.tensor([[True, False, True], [False, False, True]]), (16, 32))
    w = torch.randn(layout.nnz, 16, 32)
    x = torch.randn(5, 96)
    dense = layout.unpack(w)
    torch.testing.assert_close(block_sparse_linear(x, w, layout), x @ dense.t())


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 64)])
def test_linear_weight_grad_groups_end_at_row_ends(block):
    """The weight-gradient kernel stacks up to 64 // bk blocks of one block row: rows of 5, 0, 9, 3 blocks."""
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, [0, 2, 3, 5, 8]] = True
    mask[2, :] = True
    mask[3, [1, 4, 7]] = True
    check_linear(mask, block, (21,), torch.float32, with_bias=False)
