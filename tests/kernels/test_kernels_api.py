"""Public API: bad input errors, torch.compile tracing, and no kernel recompiles on a new layout."""
import pytest
import torch

import blockdpr_kernels as bk
from blockdpr_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear
from blockdpr_kernels import ops
from blockdpr_kernels.testing import SKIP_REASON, kernel_device, kernels, record_specializations

DEVICE = kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
CL = torch.channels_last


def linear_case(dtype=torch.float32):
    layout = BlockLayout(torch.tensor([[True, False], [True, True]]), (16, 32))
    return torch.randn(5, 64, dtype=dtype), torch.randn(3, 16, 32, dtype=dtype), layout, torch.randn(32, dtype=dtype)


def conv_case(dtype=torch.float32):
    layout = BlockLayout(torch.rand(2, 18, generator=torch.Generator().manual_seed(0)) < 0.5, (16, 16))
    x = torch.randn(2, 32, 5, 5, dtype=dtype).contiguous(memory_format=CL)
    return x, torch.randn(layout.nnz, 16, 16, dtype=dtype), layout, torch.randn(32, dtype=dtype)


LINEAR_BAD = [
    ("layout: expected a BlockLayout", TypeError, lambda x, v, L, b: dict(layout="nope")),
    ("x: expected a tensor", TypeError, lambda x, v, L, b: dict(x=x.tolist())),
    ("x: expected dtype", TypeError, lambda x, v, L, b: dict(x=x.int(), values=v.int(), bias=None)),
    ("x: expected last dim K = 64", ValueError, lambda x, v, L, b: dict(x=x[:, :48].contiguous())),
    ("x: expected a contiguous", ValueError, lambda x, v, L, b: dict(x=torch.randn(64, 5).t())),
    ("x: expected device", ValueError, lambda x, v, L, b: dict(x=x.to("meta"))),
    ("values: expected dtype", TypeError, lambda x, v, L, b: dict(values=v.double())),
    ("values: expected packed shape", ValueError, lambda x, v, L, b: dict(values=v[:2])),
    ("values: expected packed shape", ValueError, lambda x, v, L, b: dict(values=v.transpose(1, 2))),
    ("values: expected a contiguous", ValueError, lambda x, v, L, b: dict(values=torch.randn(3, 32, 16).transpose(1, 2))),
    ("values: expected device", ValueError, lambda x, v, L, b: dict(values=v.to("meta"))),
    ("layout.block: expected bn", ValueError,
     lambda x, v, L, b: dict(layout=BlockLayout(torch.ones(4, 2, dtype=torch.bool), (8, 32)), values=torch.randn(8, 8, 32))),
    ("bias: expected shape", ValueError, lambda x, v, L, b: dict(bias=b[:16])),
    ("bias: expected dtype", TypeError, lambda x, v, L, b: dict(bias=b.half())),
    ("bias: expected device", ValueError, lambda x, v, L, b: dict(bias=b.to("meta"))),
    ("bias: expected a tensor", TypeError, lambda x, v, L, b: dict(bias=1.0)),
    ("backend: expected one of", ValueError, lambda x, v, L, b: dict(backend="cuda")),
]


@pytest.mark.parametrize("match,exc,change", LINEAR_BAD, ids=[f"linear-{i}" for i in range(len(LINEAR_BAD))])
def test_linear_bad_input(match, exc, change):
    x, v, layout, b = linear_case()
    args = dict(x=x, values=v, layout=layout, bias=b, backend="reference")
    args.update(change(x, v, layout, b))
    with pytest.raises(exc, match=match):
        block_sparse_linear(**args)


CONV_BAD = [
    ("x: expected channels_last", ValueError, lambda x, v, L, b: dict(x=x.contiguous())),
    ("x: expected a 4-D", ValueError, lambda x, v, L, b: dict(x=x[0])),
    ("x: expected C_in a multiple of the block size", ValueError,
     lambda x, v, L, b: dict(x=torch.randn(2, 24, 5, 5).contiguous(memory_format=CL),
                             layout=BlockLayout(torch.ones(2, 9 * 24 // 16 + 1, dtype=torch.bool)[:, :13], (16, 16)),
                             values=torch.randn(26, 16, 16))),
    ("x: C_in = 32 does not fit the layout: a 1x1 kernel", ValueError, lambda x, v, L, b: dict(kernel_size=1)),
    ("x: C_in = 144 does not fit the layout: a 3x3 kernel .* expects C_in = 64", ValueError,  # not a 2x2 conv
     lambda x, v, L, b: dict(x=torch.randn(2, 144, 5, 5).contiguous(memory_format=CL),
                             layout=BlockLayout(torch.ones(1, 36, dtype=torch.bool), (16, 16)),
                             values=torch.randn(36, 16, 16), bias=None)),
    ("kernel_size: expected a positive int", ValueError, lambda x, v, L, b: dict(kernel_size=(3, 0))),
    ("kernel_size: expected a positive int", ValueError, lambda x, v, L, b: dict(kernel_size=(3, 3, 3))),
    ("stride: expected one of", ValueError, lambda x, v, L, b: dict(stride=3)),
    ("stride: expected an int or a pair of equal", ValueError, lambda x, v, L, b: dict(stride=(1, 2))),
    ("padding: expected one of", ValueError, lambda x, v, L, b: dict(padding=2)),
    ("padding: expected an int", TypeError, lambda x, v, L, b: dict(padding="same")),
    ("dilation: expected 1", ValueError, lambda x, v, L, b: dict(dilation=2)),
    ("groups: expected 1", ValueError, lambda x, v, L, b: dict(groups=2)),
    ("x: spatial size", ValueError,
     lambda x, v, L, b: dict(x=torch.randn(2, 32, 2, 2).contiguous(memory_format=CL), padding=0)),
    ("layout.block: expected bk", ValueError,
     lambda x, v, L, b: dict(layout=BlockLayout(torch.ones(1, 9, dtype=torch.bool), (32, 128)),
                             x=torch.randn(2, 128, 5, 5).contiguous(memory_format=CL), values=torch.randn(9, 32, 128),
                             bias=None)),
    ("values: expected packed shape", ValueError, lambda x, v, L, b: dict(values=v[1:])),
    ("values: expected dtype", TypeError, lambda x, v, L, b: dict(values=v.half())),
    ("bias: expected shape", ValueError, lambda x, v, L, b: dict(bias=b[:16])),
]


@pytest.mark.parametrize("match,exc,change", CONV_BAD, ids=[f"conv-{i}" for i in range(len(CONV_BAD))])
def test_conv_bad_input(match, exc, change):
    x, v, layout, b = conv_case()
    args = dict(x=x, values=v, layout=layout, bias=b, stride=1, padding=1, kernel_size=3, backend="reference")
    args.update(change(x, v, layout, b))
    with pytest.raises(exc, match=match):
        block_sparse_conv2d(**args)


def test_conv_kernel_size_is_required():
    """The layout's K = R*S*C_in does not say R*S (576 is 3x3 over 64 channels or 2x2 over 144)."""
    x, v, layout, b = conv_case()
    with pytest.raises(TypeError, match="kernel_size"):
        block_sparse_conv2d(x, v, layout, b, padding=1)


@needs_kernels
def test_triton_rejects_fp64():
    x, v, layout, b = linear_case(torch.float64)
    with pytest.raises(TypeError, match="x: expected dtype"):
        block_sparse_linear(x.to(DEVICE), v.to(DEVICE), layout.to(DEVICE), backend="triton")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(ops.conv, "CPU_LAUNCH", False)
    x, v, layout, b = linear_case()
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        block_sparse_linear(x, v, layout, backend="triton")


def test_public_api():
    for name in ("BlockLayout", "block_sparse_linear", "block_sparse_conv2d", "from_dense", "to_dense",
                 "BlockSparseConv2d", "BlockSparseLinear"):
        assert name in bk.__all__ and hasattr(bk, name)


def _fresh_layout(shape, block, nnz, seed, device="cpu"):
    """A random layout with exactly nnz blocks."""
    grid = (shape[0] // block[0], shape[1] // block[1])
    order = torch.randperm(grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[order[:nnz]] = True
    return BlockLayout(mask.reshape(grid).to(device), block)


def test_compile_no_graph_break_and_no_recompile_on_new_layout():
    """fullgraph=True: the ops trace without graph breaks (fake impls, autograd); a new
    layout with the same nnz re-uses the compiled graph (the layout is data)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def model(x, lin_values, lin_layout, conv_values, conv_layout):
        h = block_sparse_conv2d(x, conv_values, conv_layout, stride=2, padding=1, kernel_size=3)
        h = h.mean(dim=(2, 3))
        return block_sparse_linear(torch.relu(h), lin_values, lin_layout).square().sum()

    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    for seed in range(3):
        conv_layout = _fresh_layout((32, 144), (16, 16), 7, seed)
        lin_layout = _fresh_layout((32, 32), (16, 16), 2, seed)
        cv = torch.randn(7, 16, 16, requires_grad=True)
        lv = torch.randn(2, 16, 16, requires_grad=True)
        loss = model(x, lv, lin_layout, cv, conv_layout)
        loss.backward()
        # compare with eager
        cv2, lv2 = cv.detach().clone().requires_grad_(), lv.detach().clone().requires_grad_()
        h = block_sparse_conv2d(x, cv2, conv_layout, stride=2, padding=1, kernel_size=3).mean(dim=(2, 3))
        ref = block_sparse_linear(torch.relu(h), lv2, lin_layout).square().sum()
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(cv.grad, cv2.grad)
        torch.testing.assert_close(lv.grad, lv2.grad)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def _launch_all(layout_lin, layout_conv, dtype):
    x = torch.randn(7, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(layout_lin.nnz, 16, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    block_sparse_linear(x, v, layout_lin, backend="triton").sum().backward()
    xc = torch.randn(1, 16, 4, 4, device=DEVICE, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    vc = torch.randn(layout_conv.nnz, 16, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    block_sparse_conv2d(xc, vc, layout_conv, padding=1, kernel_size=3, backend="triton").sum().backward()


@needs_kernels
def test_new_layout_does_not_add_kernel_variant():
    """Rebuilding layouts (other patterns, other nnz) with the same shapes launches kernels with the
    same specialisation keys, i.e. no new compiled variant; a new block shape does need one."""
    keys = []
    for seed, (nnz_lin, nnz_conv) in enumerate([(5, 9), (3, 9), (16, 1), (1, 18)]):
        with record_specializations() as seen:
            _launch_all(_fresh_layout((64, 64), (16, 16), nnz_lin, seed, DEVICE),
                        _fresh_layout((32, 144), (16, 16), nnz_conv, seed, DEVICE), torch.float32)
        keys.append(sorted(set(seen)))
    assert {name for name, _ in keys[0]} == set(kernels())
    assert all(k == keys[0] for k in keys), "a layout change produced a new kernel specialisation"
    with record_specializations() as seen:
        x = torch.randn(7, 64, device=DEVICE)
        layout = _fresh_layout((64, 64), (32, 16), 3, 0, DEVICE)
        block_sparse_linear(x, torch.randn(3, 32, 16, device=DEVICE), layout, backend="triton")
    assert not set(seen) <= set(keys[0])  # sanity: the recorder sees real changes
    if DEVICE.type == "cuda":  # on a GPU, also count the compile cache itself
        def variants():
            return sum(len(c[0]) for t in kernels().values() for c in t.fn.device_caches.values())
        before = variants()
        _launch_all(_fresh_layout((64, 64), (16, 16), 9, 9, DEVICE), _fresh_layout((32, 144), (16, 16), 4, 9, DEVICE),
                    torch.float32)
        assert variants() == before


def test_tf32_only_when_torch_allows(monkeypatch):
    if not ops.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(ops.conv, "INTERPRET", False)
    assert ops.conv._precision(torch.float32, True) == "tf32"
    assert ops.conv._precision(torch.float32, False) == "ieee"
    assert ops.conv._precision(torch.bfloat16, False) == "ieee"


def test_autocast_casts_inputs_like_dense_ops():
    """Under autocast, fp32 parameters meet low-precision activations as F.linear / F.conv2d would."""
    x, v, layout, b = linear_case()
    v.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x, v, layout, b)
        xc, vc, clayout, bc = conv_case()
        yc = block_sparse_conv2d(xc, vc, clayout, bc, padding=1, kernel_size=3)
    assert y.dtype == torch.bfloat16 and yc.dtype == torch.bfloat16
    y.float().sum().backward()
    assert v.grad.dtype == torch.float32
    ref = x.bfloat16().float() @ layout.unpack(v.detach().bfloat16().float()).t() + b.bfloat16().float()
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)


def test_config_pruning_keeps_a_config_and_drops_known_bad_tiles():
    """conv.prune_configs (the autotuners' early_config_prune): figures from bench/aot.py."""
    import triton
    fits = ops.conv.config_fits
    cfg = lambda bm, w, s=3: triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)  # noqa: E731
    every = [cfg(bm, w, s) for bm in (64, 128) for w in (4, 8) for s in (2, 4)]
    for kernel in ("fwd", "dgrad", "wgrad"):
        for block in (16, 32, 64, 128):
            for elem in (2, 4):
                for limit, hopper in ((227 * 1024, True), (163 * 1024, False)):
                    kept = ops.conv.prune_configs(kernel, every, block, block, elem, limit, hopper)
                    assert kept and all(c in every for c in kept)
                    assert all(ops.conv._cost(kernel, c, block, block, elem, hopper)[1] <= limit for c in kept)
    assert not fits("fwd", cfg(128, 4), 128, 128, 4, 227 * 1024, True)    # spills (255 regs)
    assert not fits("fwd", cfg(128, 8), 128, 128, 4, 227 * 1024, True)    # 384 KB of shared memory
    assert not fits("fwd", cfg(128, 4), 128, 128, 2, 163 * 1024, False)   # spills on sm_80
    assert not fits("wgrad", cfg(128, 8, 4), 64, 64, 4, 227 * 1024, True)  # 257 KB
    assert not fits("fwd", cfg(128, 8, 4), 128, 128, 2, 227 * 1024, True)  # 4 stages of 64 KB
    assert not fits("fwd", cfg(64, 8, 2), 32, 32, 2, 163 * 1024, False)   # 2 stages: 1 buffer on sm_80
    assert not fits("dgrad", cfg(256, 4, 4), 16, 16, 2, 163 * 1024, False)  # 8 B spill on sm_80
    assert fits("dgrad", cfg(256, 8, 4), 16, 16, 2, 163 * 1024, False)
    assert fits("dgrad", cfg(256, 4, 4), 16, 16, 2, 227 * 1024, True)
    assert fits("fwd", cfg(128, 8, 2), 128, 128, 2, 227 * 1024, True)
    assert fits("fwd", cfg(128, 4, 4), 32, 32, 2, 227 * 1024, True)
    assert fits("wgrad", cfg(128, 4, 4), 32, 32, 2, 227 * 1024, True)
    (fallback,) = ops.conv.prune_configs("fwd", every, 128, 128, 4, 163 * 1024, False)  # TF32, A100: none fits
    assert (fallback.kwargs["BLOCK_M"], fallback.num_warps, fallback.num_stages) == (64, 8, 2)
