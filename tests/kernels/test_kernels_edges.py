"""The ops at their edges (issue 23, item 10): bf16 under the interpreter is refused, forward-mode AD
is exact, double backward raises, and a non-finite input reaches the same outputs on both backends
(absent blocks are never read)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from blockdpr_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear
from blockdpr_kernels import conv as _conv
from blockdpr_kernels.testing import SKIP_REASON, kernel_device

DEVICE = kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
CL = torch.channels_last
F64 = torch.float64


def _mask(grid, density, seed):
    return torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < density


def _randn(*shape, dtype=F64, device="cpu", cl=False, seed=0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    return t.contiguous(memory_format=CL) if cl else t


def _linear_case(dtype=F64, device="cpu"):
    layout = BlockLayout(_mask((2, 3), 0.5, 1).to(device), (16, 16))
    return (_randn(5, 48, dtype=dtype, device=device), _randn(layout.nnz, 16, 16, dtype=dtype, device=device, seed=1),
            layout, _randn(32, dtype=dtype, device=device, seed=2))


def _conv_case(dtype=F64, device="cpu"):
    layout = BlockLayout(_mask((2, 9 * 2), 0.4, 3).to(device), (16, 16))  # 32 <- 3x3 x 32
    return (_randn(2, 32, 5, 4, dtype=dtype, device=device, cl=True),
            _randn(layout.nnz, 16, 16, dtype=dtype, device=device, seed=1), layout,
            _randn(32, dtype=dtype, device=device, seed=2))


def _dense_conv_weight(layout, values):
    return layout.unpack(values).reshape(layout.shape[0], 3, 3, -1).permute(0, 3, 1, 2)


OPS = {
    "linear": (_linear_case, lambda x, v, L, b, backend: block_sparse_linear(x, v, L, b, backend=backend),
               lambda x, v, L, b: F.linear(x, L.unpack(v), b)),
    "conv": (_conv_case, lambda x, v, L, b, backend: block_sparse_conv2d(x, v, L, b, padding=1, kernel_size=3,
                                                                         backend=backend),
             lambda x, v, L, b: F.conv2d(x, _dense_conv_weight(L, v), b, padding=1)),
}


# ----------------------------------------------------------------------------- (a) bf16 under the interpreter

@pytest.mark.skipif(DEVICE is None or not _conv.INTERPRET, reason="only the Triton interpreter gets bf16 wrong")
@pytest.mark.parametrize("op", OPS)
def test_bf16_through_triton_under_the_interpreter_is_refused(op):
    case, sparse, _ = OPS[op]
    x, v, layout, b = case(torch.bfloat16, DEVICE)
    with pytest.raises(TypeError, match=r"torch.bfloat16 .*TRITON_INTERPRET=1.*triton issue 11584"):
        sparse(x, v, layout, b, "triton")
    sparse(x, v, layout, b, "reference")  # the reference backend still takes bf16


# ----------------------------------------------------------------------------- (b) forward-mode AD

def _tangents(x, v, b):
    return tuple(torch.randn_like(t).contiguous(memory_format=CL) if t.dim() == 4 else torch.randn_like(t)
                 for t in (x, v, b))


@pytest.mark.parametrize("op", OPS)
def test_func_jvp_matches_the_dense_op_in_float64(op):
    case, sparse, dense = OPS[op]
    x, v, layout, b = case()
    tangents = _tangents(x, v, b)
    y, y_dot = torch.func.jvp(lambda x, v, b: sparse(x, v, layout, b, "reference"), (x, v, b), tangents)
    y_ref, y_dot_ref = torch.func.jvp(lambda x, v, b: dense(x, v, layout, b), (x, v, b), tangents)
    assert y_dot.abs().max() > 1  # not the silent zero tangent
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y_dot, y_dot_ref)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("which", [0, 1, 2])  # a tangent on x, values or bias alone
def test_forward_ad_dual_tensors_in_float64(op, which):
    case, sparse, dense = OPS[op]
    x, v, layout, b = case()
    tangents = _tangents(x, v, b)
    primals = [x, v, b]
    with fwAD.dual_level():
        duals = list(primals)
        duals[which] = fwAD.make_dual(primals[which], tangents[which])
        y_dot = fwAD.unpack_dual(sparse(*duals[:2], layout, duals[2], "reference")).tangent
    assert y_dot is not None
    def dense_in(t):  # the dense op as a function of the one input with a tangent
        args = list(primals)
        args[which] = t
        return dense(args[0], args[1], layout, args[2])
    expected = torch.func.jvp(dense_in, (primals[which],), (tangents[which],))[1]
    torch.testing.assert_close(y_dot, expected)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_func_jvp_through_triton_matches_reference(op):
    case, sparse, _ = OPS[op]
    x, v, layout, b = case(torch.float32, DEVICE)
    tangents = _tangents(x, v, b)
    got = torch.func.jvp(lambda x, v, b: sparse(x, v, layout, b, "triton"), (x, v, b), tangents)
    want = torch.func.jvp(lambda x, v, b: sparse(x, v, layout, b, "reference"), (x, v, b), tangents)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises(op):
    case, sparse, _ = OPS[op]
    x, v, layout, b = (t.requires_grad_() if torch.is_tensor(t) else t for t in case())
    (gx,) = torch.autograd.grad(sparse(x, v, layout, b, "reference").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- (d) non-finite inputs

def _linear_nan_case(device, dtype=torch.float32):
    """Block column 2 is read by block row 0 only; a NaN there reaches y[:, :16] and nothing else."""
    mask = torch.tensor([[True, False, True], [True, True, False]])
    layout = BlockLayout(mask.to(device), (16, 16))
    x = _randn(6, 48, dtype=dtype, device=device)
    x[1, 40] = float("nan")
    x[4, 33] = float("inf")
    return x, _randn(layout.nnz, 16, 16, dtype=dtype, device=device, seed=1), layout


def _expected_linear_nonfinite(x):
    bad = torch.zeros(6, 32, dtype=torch.bool)
    bad[1, :16] = bad[4, :16] = True
    return bad


BACKENDS = ["reference"] + (["triton"] if DEVICE is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_nonfinite_input_reaches_only_outputs_of_stored_blocks(backend):
    device = DEVICE if backend == "triton" else "cpu"
    x, v, layout = _linear_nan_case(device)
    y = block_sparse_linear(x, v, layout, backend=backend)
    assert torch.equal(~y.isfinite().cpu(), _expected_linear_nonfinite(x))
    clean = x.clone()
    clean[1, 40] = clean[4, 33] = 0
    finite = _expected_linear_nonfinite(x).logical_not().to(device)
    torch.testing.assert_close(y[finite], block_sparse_linear(clean, v, layout, backend=backend)[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_nonfinite_output_gradient_reaches_only_inputs_of_stored_blocks(backend):
    device = DEVICE if backend == "triton" else "cpu"
    _, v, layout = _linear_nan_case(device)
    x = _randn(6, 48, device=device, dtype=torch.float32).requires_grad_()
    dy = _randn(6, 32, device=device, dtype=torch.float32, seed=3)
    dy[2, 20] = float("nan")  # block row 1 reads block columns 0 and 1 only
    block_sparse_linear(x, v, layout, backend=backend).backward(dy)
    bad = torch.zeros(6, 48, dtype=torch.bool)
    bad[2, :32] = True
    assert torch.equal(~x.grad.isfinite().cpu(), bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_nonfinite_input_reaches_only_outputs_of_stored_blocks(backend):
    """Input channel block 1 (channels 16..31) is read by output block 0 at the centre tap only."""
    device = DEVICE if backend == "triton" else "cpu"
    mask = torch.zeros(2, 18, dtype=torch.bool)
    mask[0, 4 * 2 + 1] = True            # out block 0 <- centre tap (4), in block 1
    mask[:, 0] = mask[1, 2 * 2] = True   # in block 0 at taps 0 and 2
    layout = BlockLayout(mask.to(device), (16, 16))
    x = _randn(1, 32, 4, 4, device=device, dtype=torch.float32, cl=True)
    x[0, 20, 1, 2] = float("nan")
    v = _randn(layout.nnz, 16, 16, device=device, dtype=torch.float32, seed=1)
    y = block_sparse_conv2d(x, v, layout, padding=1, kernel_size=3, backend=backend)
    bad = torch.zeros(1, 32, 4, 4, dtype=torch.bool)
    bad[0, :16, 1, 2] = True  # the centre tap maps the pixel to itself, output block 0 only
    assert torch.equal(~y.isfinite().cpu(), bad)


@needs_kernels
@pytest.mark.parametrize("op", OPS)
def test_both_backends_agree_on_which_outputs_are_nonfinite(op):
    case, sparse, _ = OPS[op]
    x, v, layout, b = case(torch.float32, DEVICE)
    x = x.clone()
    flat = x.view(-1) if x.dim() == 2 else x.permute(0, 2, 3, 1).view(-1)  # a view of x's memory
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:3]] = float("nan")
    got, want = (sparse(x, v, layout, b, backend) for backend in ("triton", "reference"))
    assert torch.equal(got.isnan(), want.isnan())
    assert not got.isnan().all()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=1e-4, rtol=1e-4)
