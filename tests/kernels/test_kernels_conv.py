"""Block-sparse conv2d (implicit GEMM, NHWC): Triton kernels (interpreter on CPU) against the reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blockdpr_kernels import BlockLayout, block_sparse_conv2d
from blockdpr_kernels import conv as _conv
from blockdpr_kernels.testing import BF16_SKIP_REASON, SKIP_REASON, kernel_device

DEVICE = kernel_device()  # cuda, or cpu under TRITON_INTERPRET=1 (tests/conftest.py)
if DEVICE is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

BF16_SKIP = pytest.mark.skipif(_conv.INTERPRET, reason=BF16_SKIP_REASON)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}
CL = torch.channels_last


def run_conv(x, values, layout, bias, dy, geometry, backend):
    """Output and (dx, dvalues, dbias) of the op with the given backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, values) + ((bias,) if bias is not None else ())]
    y = block_sparse_conv2d(leaves[0], leaves[1], layout, leaves[2] if bias is not None else None,
                            stride=geometry[1], padding=geometry[2], kernel_size=geometry[0], backend=backend)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def check_conv(mask, block, batch, hw, kernel, stride, padding, dtype, with_bias, seed=0):
    """mask is the block mask of W [C_out, R*R*C_in]; C_in follows from its width."""
    g = torch.Generator().manual_seed(seed)
    layout = BlockLayout(mask.to(DEVICE), block)
    c_out, k = layout.shape
    c_in = k // (kernel * kernel)
    x = torch.randn(batch, c_in, *hw, generator=g).to(DEVICE, dtype).contiguous(memory_format=CL)
    values = torch.randn(layout.nnz, *block, generator=g).to(DEVICE, dtype)
    bias = torch.randn(c_out, generator=g).to(DEVICE, dtype) if with_bias else None
    p, q = ((s + 2 * padding - kernel) // stride + 1 for s in hw)
    dy = torch.randn(batch, c_out, p, q, generator=g).to(DEVICE, dtype).contiguous(memory_format=CL)
    geometry = (kernel, stride, padding)
    y, grads = run_conv(x, values, layout, bias, dy, geometry, "triton")
    y_ref, grads_ref = run_conv(x, values, layout, bias, dy, geometry, "reference")
    assert y.dtype == dtype and y.shape == (batch, c_out, p, q) and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, want, name in zip(grads, grads_ref, ("dx", "dvalues", "dbias")):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def random_mask(c_out_blocks, k_blocks, density, seed):
    return torch.rand(c_out_blocks, k_blocks, generator=torch.Generator().manual_seed(seed)) < density


@st.composite
def conv_cases(draw):
    kernel, stride, padding = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1]))
    block = (draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32])))
    grid = (draw(st.integers(1, 2)), kernel * kernel * draw(st.integers(1, 2)))
    bits = draw(st.lists(st.booleans(), min_size=grid[0] * grid[1], max_size=grid[0] * grid[1]))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(grid)
    lo = max(1, kernel - 2 * padding)
    hw = (draw(st.integers(lo, 7)), draw(st.integers(lo, 7)))
    return (mask, block, draw(st.integers(1, 3)), hw, kernel, stride, padding,
            draw(st.sampled_from([torch.float32, torch.float16])), draw(st.booleans()))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_cases())
def test_conv_random(case):
    check_conv(*case)


@pytest.mark.parametrize("kernel,stride,padding", [(k, s, p) for k in (1, 3) for s in (1, 2) for p in (0, 1)])
def test_conv_each_geometry(kernel, stride, padding):
    """Every supported kernel/stride/padding, odd batch and odd non-square spatial size."""
    check_conv(random_mask(2, 2 * kernel * kernel, 0.5, kernel + 10 * stride + 100 * padding), (16, 16), 3, (5, 7),
               kernel, stride, padding, torch.float32, with_bias=True)


@pytest.mark.parametrize("kind", ["empty", "dense", "single", "empty_row_col"])
def test_conv_special_layouts(kind):
    mask = torch.zeros(2, 9 * 2, dtype=torch.bool)
    if kind == "dense":
        mask[:] = True
    elif kind == "single":
        mask[1, 13] = True
    elif kind == "empty_row_col":
        mask[0, :] = True
        mask[:, 4] = False
    check_conv(mask, (16, 16), 1, (3, 4), 3, 1, 1, torch.float16, with_bias=True)


def test_conv_block_64():
    check_conv(random_mask(1, 9, 0.6, 3), (64, 64), 1, (3, 3), 3, 2, 1, torch.float32, with_bias=False)


def test_conv_rectangular_kernel_and_spatial_edges():
    """1x3 kernel (kernel_size inferred only for squares, so it is passed), spatial 1 x 9."""
    layout = BlockLayout(random_mask(1, 3, 1.0, 4).to(DEVICE), (16, 16))
    x = torch.randn(2, 16, 1, 9, device=DEVICE).contiguous(memory_format=CL)
    v = torch.randn(layout.nnz, 16, 16, device=DEVICE)
    outs = [block_sparse_conv2d(x, v, layout, padding=1, kernel_size=(1, 3), backend=b)
            for b in ("triton", "reference")]
    torch.testing.assert_close(*outs, **TOL[torch.float32])


@pytest.mark.parametrize("hw,stride,batch", [((4, 4), 1, 5), ((8, 4), 1, 3), ((4, 4), 2, 11), ((2, 1), 2, 40)])
def test_conv_weight_grad_whole_image_tiles(hw, stride, batch):
    """Output images that tile BLOCK_M exactly (P*Q divides it): the weight gradient computes one tile's
    pixel pattern and moves it by whole images per tile, over several tiles (the last one partial but for 8x4)."""
    p, q = ((s + 2 - 3) // stride + 1 for s in hw)
    block_m = _conv._configs()[0].kwargs["BLOCK_M"]
    assert block_m % (p * q) == 0 and batch * p * q > block_m, "not the case meant"
    check_conv(random_mask(2, 9 * 2, 0.5, 8), (16, 16), batch, hw, 3, stride, 1, torch.float32, with_bias=False)


@BF16_SKIP
def test_conv_bf16():
    check_conv(random_mask(4, 9 * 4, 0.3, 5), (32, 32), 3, (8, 8), 3, 1, 1, torch.bfloat16, with_bias=True)


def test_conv_gradcheck_reference_fp64():
    layout = BlockLayout(random_mask(1, 9, 0.5, 6) | torch.eye(1, 9, dtype=torch.bool), (16, 16))
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    v = torch.randn(layout.nnz, 16, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: block_sparse_conv2d(x, v, layout, b, stride=2, padding=1, kernel_size=3, backend="reference"),
        (x, v, b), fast_mode=True)


def test_conv_auto_on_cpu_matches_dense():
    """CPU tensors with backend='auto' use the reference path: equal to F.conv2d."""
    layout = BlockLayout(random_mask(2, 9, 0.5, 7), (16, 16))
    v = torch.randn(layout.nnz, 16, 16)
    dense = layout.unpack(v).reshape(32, 3, 3, 16).permute(0, 3, 1, 2)
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=CL)
    torch.testing.assert_close(block_sparse_conv2d(x, v, layout, stride=2, padding=1, kernel_size=3),
                               torch.nn.functional.conv2d(x, dense, stride=2, padding=1))
