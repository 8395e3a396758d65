"""PackedStorage: several layers' blocks in one values tensor, rewritten in place when blocks move between layers."""
import copy

import pytest
import torch
from torch import nn

from blockdpr_kernels import BlockLayout, BlockSparseConv2d, BlockSparseLinear, PackedStorage
from blockdpr_kernels.testing import SKIP_REASON, kernel_device, record_work


def layers(seed=0, dtype=torch.float32):
    """Two convs and a linear of one block size: what a model's sparse layers look like."""
    torch.manual_seed(seed)
    convs = [BlockSparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1), 16, density=d).to(dtype) for d in (0.3, 0.5)]
    return convs + [BlockSparseLinear.from_dense(nn.Linear(32, 48), 16, density=0.5).to(dtype)]


def run(mods, x, backend):
    """Loss of a small chain over the layers, and the gradient of every layer's own blocks and of x."""
    for m in mods:
        m.backend = backend
    x = x.clone().requires_grad_(True)
    h = mods[1](mods[0](x))
    y = mods[2](h.mean((2, 3)))
    y.square().sum().backward()
    return y.detach(), x.grad


def own_grads(mods):
    """Each layer's gradient of its own blocks ([nnz, bn, bk] each)."""
    if mods[0].layout.shared:
        grad = mods[0]._parameters["packed"].grad
        return [grad.narrow(0, m.layout.offset, m.layout.nnz) for m in mods]
    return [m.values.grad for m in mods]


def assert_same_computation(shared, own, backend):
    """The chain's output, input gradient and each layer's block gradients agree (fp32, 1e-5)."""
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=torch.channels_last)
    y_own, dx_own = run(own, x, backend)
    y_shared, dx_shared = run(shared, x, backend)
    torch.testing.assert_close(y_shared, y_own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_shared, dx_own, rtol=1e-5, atol=1e-5)
    for a, b in zip(own_grads(shared), own_grads(own)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


BACKENDS = ["reference"] + (["triton"] if kernel_device() is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_layers_compute_what_their_own_layers_compute(backend):
    own = layers()
    shared = copy.deepcopy(own)
    storage = PackedStorage(shared)
    assert storage.total == sum(m.layout.nnz for m in own)
    assert len({id(p) for m in shared for p in m.parameters()} & {id(storage.values)}) == 1
    assert_same_computation(shared, own, backend)
    assert storage.values.grad.shape == storage.values.shape


def moved_masks(mods, gen):
    """New masks moving two blocks from layer 0 into layer 1 (the total is the same)."""
    masks = [m.layout.mask for m in mods]
    on, off = masks[0].reshape(-1).nonzero().squeeze(1), (~masks[1]).reshape(-1).nonzero().squeeze(1)
    masks[0].view(-1)[on[torch.randperm(len(on), generator=gen)[:2]]] = False
    masks[1].view(-1)[off[torch.randperm(len(off), generator=gen)[:2]]] = True
    return masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_in_place_keeps_every_tensor_and_equals_layers_built_for_the_new_masks(backend):
    shared = layers()
    storage = PackedStorage(shared)
    masks = moved_masks(shared, torch.Generator().manual_seed(1))
    counts = [int(m.sum()) for m in masks]
    tensors = [t for m in shared for t in (m.layout.row_ptr, m.layout.col_ptr, m.layout.row_prefix, m.layout.col_idx,
                                          m.layout.col_perm, m.layout.wgrad_groups)]
    pointers = [t.data_ptr() for t in tensors] + [storage.values.data_ptr()]
    # the new values in the new order: random, the same for the fresh layers built for the masks
    fresh = []
    for m, mask in zip(shared, masks):
        f = copy.deepcopy(m)
        f._parameters.pop("packed")
        f.layout = BlockLayout(mask, m.block)
        f.values = nn.Parameter(torch.randn(f.layout.nnz, *m.block))
        fresh.append(f)
    with record_work() as work:
        storage.update_(masks, counts)
    assert work.syncs == {}, "update_ reads nothing back from the device"
    with torch.no_grad():
        storage.values.copy_(torch.cat([f.values.detach() for f in fresh]))
    assert [t.data_ptr() for t in tensors] + [storage.values.data_ptr()] == pointers
    assert [m.layout.nnz for m in shared] == counts and counts != [m.layout.nnz for m in layers()]
    for m, mask in zip(shared, masks):
        assert torch.equal(m.layout.mask, mask)
    assert_same_computation(shared, fresh, backend)


def test_a_shared_layer_state_dict_holds_its_own_blocks_and_loads_only_into_its_structure():
    own = layers()
    shared = copy.deepcopy(own)
    PackedStorage(shared)
    for o, s in zip(own, shared):
        state = s.state_dict()
        assert set(state) == set(o.state_dict())  # values (its rows), block_mask, bias: no "packed"
        assert torch.equal(state["values"], o.state_dict()["values"])
    other = copy.deepcopy(shared)
    with torch.no_grad():
        for m in other:
            m.values.mul_(2)
    for s, o in zip(shared, other):
        s.load_state_dict(o.state_dict())
        assert torch.equal(s.values, o.values)
    wrong = own[0].state_dict()
    wrong["block_mask"] = ~wrong["block_mask"]
    with pytest.raises(RuntimeError, match="shares a PackedStorage and its structure differs"):
        shared[0].load_state_dict(wrong)


def test_storage_refusals_name_the_problem():
    mods = layers()
    with pytest.raises(ValueError, match="share block"):
        PackedStorage([mods[0], BlockSparseLinear.from_dense(nn.Linear(32, 32), 32, density=0.5)])
    storage = PackedStorage(mods)
    with pytest.raises(ValueError, match="already shares"):
        PackedStorage(mods)
    masks = [m.layout.mask for m in mods]
    masks[0][0, 0] = not masks[0][0, 0]
    with pytest.raises(ValueError, match="a new total needs a new PackedStorage"):
        storage.update_(masks, [int(m.sum()) for m in masks])
    with pytest.raises(ValueError, match="change its structure there"):
        mods[0].set_layout(BlockLayout(masks[0], mods[0].block))
    with pytest.raises(ValueError, match="update_"):
        mods[0].layout.update_(masks[0])
    with pytest.raises(ValueError, match="cannot move layer by layer"):
        mods[0].to("meta")


@pytest.mark.skipif(kernel_device() is None, reason=SKIP_REASON)
def test_a_shared_layouts_weight_gradient_splits_as_its_own_layout_would(monkeypatch):
    """The grid covers the run capacity (any density), but the M splits follow the layer's own count."""
    from blockdpr_kernels import conv
    grids = []
    launch = conv._WGRAD.launch
    monkeypatch.setattr(conv._WGRAD, "launch", lambda grid, args: (grids.append(grid(None)), launch(grid, args))[1])
    own = layers()
    shared = copy.deepcopy(own)
    PackedStorage(shared)
    x = torch.randn(4, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    for mods in (own, shared):
        run(mods, x, "triton")
    own_grids, shared_grids = grids[:3], grids[3:]
    assert [g[1] for g in shared_grids] == [g[1] for g in own_grids], "the same M splits"
    assert any(g[1] > 1 for g in own_grids), "the test must include a split weight gradient"
    assert all(s[0] >= o[0] for s, o in zip(shared_grids, own_grids)), "programs for every run the layer could need"
    for a, b in zip(own_grads(shared), own_grads(own)):  # the split reduction into the storage's rows
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernel_device() is None, reason=SKIP_REASON)
def test_a_shared_conv_fwd_bwd_is_three_launches_and_one_zero_filled_gradient():
    """What a shared layout adds per call: the weight gradient of the storage's shape, zero-filled."""
    mods = layers()
    PackedStorage(mods)
    conv = mods[0]
    conv.backend = "triton"
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    with record_work() as work:
        conv(x).backward(dy)
    assert {k: v for k, v in work.launches.items() if v} == {"fwd": 1, "dgrad": 1, "wgrad": 1}
    assert work.ops == {"aten.empty": 2,        # y and dx (channels_last)
                        "aten.zeros_like": 1,   # dvalues: the storage's shape, zero outside the layer's rows
                        "aten.sum": 1}          # the bias gradient
    assert not work.syncs
