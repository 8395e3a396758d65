"""Per-call host path: one eager fwd+bwd dispatches only its output allocations and launches its
kernels (no custom-op dispatch: the layout holds every piece of launch metadata), the traced path
is the custom ops, the split weight gradient leaves its workspace clean, and the autotune key tells
layouts of different density apart."""
import collections

import pytest
import torch

from blockdpr_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear
from blockdpr_kernels.layout import wgrad_splits, wgrad_workspace
from blockdpr_kernels.testing import SKIP_REASON, kernel_device, record_autotune_keys, record_work

DEVICE = kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
CL = torch.channels_last
LAUNCHES = {"fwd": 1, "dgrad": 1, "wgrad": 1}


def _layout(grid, density, seed, block=(16, 16)):
    mask = torch.rand(grid, generator=torch.Generator().manual_seed(seed)) < density
    return BlockLayout(mask.to(DEVICE), block)


def _leaf(*shape, cl=False):
    t = torch.randn(*shape, device=DEVICE)
    return (t.contiguous(memory_format=CL) if cl else t).requires_grad_()


@needs_kernels
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_fwd_bwd_is_three_launches_and_the_output_allocations(with_bias):
    layout = _layout((2, 9), 0.5, 0)
    assert layout.wgrad_splits > 1  # the in-kernel split reduction is part of what is counted
    x, v = _leaf(2, 16, 5, 5, cl=True), _leaf(layout.nnz, 16, 16)
    bias = _leaf(32) if with_bias else None
    dy = torch.randn(2, 32, 5, 5, device=DEVICE).contiguous(memory_format=CL)
    with record_work() as work:
        block_sparse_conv2d(x, v, layout, bias, padding=1, kernel_size=3, backend="triton").backward(dy)
    expected = collections.Counter({  # eager: no blockdpr_kernels custom op is dispatched
        "aten.empty": 2,      # y and dx (channels_last)
        "aten.new_empty": 1,  # dvalues
    })
    if with_bias:
        expected["aten.sum"] = 1  # the bias gradient
    assert work.ops == expected
    assert work.launches == LAUNCHES
    assert not work.syncs


@needs_kernels
def test_linear_fwd_bwd_is_three_launches_and_the_output_allocations():
    layout = _layout((2, 3), 0.7, 1)
    x, v = _leaf(7, 48), _leaf(layout.nnz, 16, 16)
    dy = torch.randn(7, 32, device=DEVICE)
    with record_work() as work:
        block_sparse_linear(x, v, layout, backend="triton").backward(dy)
    assert work.ops == collections.Counter({"aten.new_empty": 3})  # y, dx, dvalues; no custom op
    assert work.launches == LAUNCHES
    assert not work.syncs


@needs_kernels
@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)])
def test_backward_launches_only_the_gradients_asked_for(needs):
    layout = _layout((2, 3), 0.7, 1)
    x = torch.randn(7, 48, device=DEVICE, requires_grad=needs[0])
    v = torch.randn(layout.nnz, 16, 16, device=DEVICE, requires_grad=needs[1])
    dy = torch.randn(7, 32, device=DEVICE)
    with record_work() as work:
        block_sparse_linear(x, v, layout, backend="triton").backward(dy)
    assert work.launches == collections.Counter({"fwd": 1, "dgrad": int(needs[0]), "wgrad": int(needs[1])})
    assert work.ops == collections.Counter({"aten.new_empty": 1 + sum(needs)})


@needs_kernels
def test_traced_path_is_the_custom_ops():
    """Under torch.compile the ops are the blockdpr_kernels custom ops (what dynamo and AOT autograd see:
    forward and gradient ops in their graphs), with the eager path's results."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return gm
        return compiler

    torch._dynamo.reset()
    layout = _layout((2, 3), 0.7, 1)
    x, v = _leaf(7, 48), _leaf(layout.nnz, 16, 16)
    dy = torch.randn(7, 32, device=DEVICE)
    step = torch.compile(lambda x, v: block_sparse_linear(x, v, layout, backend="triton"),
                         backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), fullgraph=True)
    y = step(x, v)
    y.backward(dy)
    assert "blockdpr_kernels.linear.default" in graphs["forward"]
    assert {"blockdpr_kernels.linear_grad_input.default", "blockdpr_kernels.linear_grad_weight.default"} <= graphs["backward"]
    x2, v2 = (t.detach().clone().requires_grad_() for t in (x, v))
    y2 = block_sparse_linear(x2, v2, layout, backend="triton")
    y2.backward(dy)
    torch.testing.assert_close((y, x.grad, v.grad), (y2, x2.grad, v2.grad))
    torch._dynamo.reset()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 40, 200])  # one M tile (no split) .. more tiles than splits
def test_split_weight_gradient_matches_reference_and_leaves_workspace_zero(rows):
    layout = _layout((3, 4), 0.6, 2)
    assert layout.wgrad_splits > 1
    x = torch.randn(rows, 64, device=DEVICE)
    dy = torch.randn(rows, 48, device=DEVICE)
    v = torch.randn(layout.nnz, 16, 16, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaf = v.clone().requires_grad_()
        block_sparse_linear(x, leaf, layout, backend=backend).backward(dy)
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], atol=1e-4, rtol=1e-4)
    assert not wgrad_workspace(0, DEVICE).any() and not layout.wgrad_counters.any()
    leaf = v.clone().requires_grad_()  # a second call on the same layout sees a clean workspace
    block_sparse_linear(x, leaf, layout, backend="triton").backward(dy)
    torch.testing.assert_close(leaf.grad, grads["reference"], atol=1e-4, rtol=1e-4)


def test_layouts_share_one_workspace_sized_by_the_largest():
    small = BlockLayout(torch.ones(2, 2, dtype=torch.bool, device="cpu"), (16, 16))
    before = wgrad_workspace(0, "cpu")
    big = BlockLayout(torch.ones(2, 2 * (before.numel() // 1024 + 1), dtype=torch.bool, device="cpu"), (16, 16))
    grown = wgrad_workspace(0, "cpu")
    assert grown.numel() == big.nnz * 256 >= small.nnz * 256  # the largest layout's size, not the sum
    BlockLayout(torch.ones(2, 2, dtype=torch.bool, device="cpu"), (16, 16))
    assert wgrad_workspace(0, "cpu") is grown  # a smaller layout reuses it
    assert not any(torch.is_tensor(v) and v.dtype == torch.float32 for v in vars(big).values())


def test_split_count_fills_the_device_then_stops_splitting():
    cpu = torch.device("cpu")  # 2 "SMs" off CUDA: a target of 8 programs
    assert [wgrad_splits(g, cpu) for g in (0, 1, 3, 8, 500)] == [1, 8, 3, 1, 1]
    layout = BlockLayout(torch.ones(4, 8, dtype=torch.bool), (16, 16))  # 8 runs of 4 blocks
    assert layout.wgrad_splits == 1


@needs_kernels
def test_density_bucket_separates_dense_from_sparse_in_the_autotune_key():
    x = torch.randn(3, 640, device=DEVICE, requires_grad=True)
    dense = BlockLayout(torch.ones(4, 40, dtype=torch.bool, device=DEVICE), (16, 16))

    def exactly(nnz, seed):  # 10% of the blocks, other patterns
        mask = torch.zeros(160, dtype=torch.bool)
        mask[torch.randperm(160, generator=torch.Generator().manual_seed(seed))[:nnz]] = True
        return BlockLayout(mask.reshape(4, 40).to(DEVICE), (16, 16))

    keys = []
    for layout in (dense, exactly(16, 0), exactly(16, 1)):
        v = torch.randn(layout.nnz, 16, 16, device=DEVICE, requires_grad=True)
        with record_autotune_keys() as seen:
            block_sparse_linear(x, v, layout, backend="triton").sum().backward()
        keys.append(dict(seen))
    assert set(keys[0]) == {"fwd", "dgrad", "wgrad"}
    assert all(keys[0][k] != keys[1][k] for k in keys[0]), "a dense and a 10% layout share an autotune key"
    assert keys[1] == keys[2], "two layouts of one density got different autotune keys"
    assert (dense.density_bucket, keys[1]["fwd"][-1]) == (6, 3)  # 40 and 4 active blocks per row


def test_launch_signature_tells_dtypes_and_each_misaligned_pointer_apart():
    """The launcher keys its compiled kernels on every tensor's dtype and 16-byte alignment (the JIT
    specialises pointers on it); the usual all-aligned case is one flag."""
    from blockdpr_kernels.launch import _signature
    scalars = (7, 1, 1, 1, 1, 48, 32, 3, 1, 1, 1, 0, 16, 16, "ieee")
    base = torch.zeros(64, dtype=torch.float16)
    aligned, offset = base[:8], base[1:9]  # offset: 2 bytes past a 16-byte boundary
    index = torch.zeros(8, dtype=torch.int32)

    def key(*tensors):
        return _signature(0, tensors, scalars, tuple(t.data_ptr() for t in tensors))

    all_aligned = key(aligned, aligned, index, index, index, aligned)
    assert all_aligned == key(base[8:16], aligned, index, index, index, aligned)  # another aligned pointer
    assert all_aligned[-1] is True
    one_off = key(aligned, offset, index, index, index, aligned)
    assert one_off != all_aligned and one_off[-1] == (True, False, True, True, True, True)
    assert key(aligned, aligned, index, index, index, offset) != one_off
    assert key(aligned.float(), aligned, index, index, index, aligned) != all_aligned  # dtype
    assert key(aligned, aligned, index, index, index, aligned)[1] == scalars
