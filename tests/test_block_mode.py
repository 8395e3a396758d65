"""Block mode: packed block-sparse layers against the dense masked reference with block units."""

import copy

import pytest
import torch
import torch.nn.functional as F

from blockdpr.models import WideResNet, sparse_parameters
from blockdpr.sparsity import DPRConfig, ElementSparsity, Reallocator
from blockdpr.sparsity.blocks import block_means, weight_to_matrix
from blockdpr.sparsity.packed import BlockSparseConv2d, dense_state_dict, load_dense_state_dict, to_block_sparse

BLOCK = 16


def test_block_sparse_conv_matches_dense_conv_of_its_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False)
    mask = torch.rand(3, 18) < 0.5
    layer = BlockSparseConv2d.from_dense(conv, block=(16, 16), mask=mask)
    x = torch.randn(3, 32, 9, 9)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.to_dense(), stride=2, padding=1), rtol=1e-5, atol=1e-5)
    kept = weight_to_matrix(layer.to_dense()).reshape(3, 16, 18, 16).ne(0).any(3).any(1)
    assert torch.equal(kept, mask)


def paired_models(sparsity=0.7, seed=0):
    """A dense-masked reference with block units and a packed block model with the same init and structure."""
    torch.manual_seed(seed)
    reference = WideResNet(10, 1)
    blocked = copy.deepcopy(reference)
    ref_sparsity = ElementSparsity.random(sparse_parameters(reference), sparsity, seed, block=(BLOCK, BLOCK))
    ref_sparsity.apply_()
    grids = {n: weight_to_matrix(m)[::BLOCK, ::BLOCK] for n, m in zip(ref_sparsity.names, ref_sparsity.masks)}
    block_sparsity, dense = to_block_sparse(blocked, ref_sparsity.names, BLOCK, sparsity, seed, masks=grids)
    assert dense == []
    return reference, ref_sparsity, blocked, block_sparsity


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def test_block_mode_matches_the_masked_reference_through_training_and_reallocation():
    reference, ref_sparsity, blocked, block_sparsity = paired_models()
    opt_ref, opt_blk = sgd(reference), sgd(blocked)
    cfg = DPRConfig(target_pruned=4, initial_threshold=0.05)
    realloc_ref = Reallocator(ref_sparsity.segments.sizes, cfg, seed=1)
    realloc_blk = Reallocator(block_sparsity.segments.sizes, cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    moved = 0
    for step in range(8):
        x = torch.randn(6, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (6,), generator=gen)
        losses = []
        for model, sparsity, opt in ((reference, ref_sparsity, opt_ref), (blocked, block_sparsity, opt_blk)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            sparsity.mask_grads_()
            opt.step()
            sparsity.apply_()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
        if step % 3 == 2:
            a = ref_sparsity.reallocate(realloc_ref, step, opt_ref)
            b = block_sparsity.reallocate(realloc_blk, step, opt_blk)
            assert torch.equal(a.survived, b.survived) and torch.equal(a.regrown, b.regrown)
            moved += b.pruned
    assert moved > 0, "the test must include a real reallocation"
    exported = dense_state_dict(blocked)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=1e-5, atol=1e-6)


def test_packed_reallocation_conserves_blocks_and_resets_new_state():
    _, _, blocked, sparsity = paired_models(sparsity=0.6)
    opt = sgd(blocked)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(blocked(x), y).backward()
    opt.step()
    nnz = [m.layout.nnz for m in sparsity.layers]
    old_values = [m.values.detach().clone() for m in sparsity.layers]
    old_buf = [b.clone() for b in sparsity.split_rows(opt.state[sparsity.params[0]]["momentum_buffer"])]
    old_masks = [m.layout.mask.clone() for m in sparsity.layers]
    result = sparsity.reallocate(Reallocator(sparsity.segments.sizes, DPRConfig(target_pruned=5, initial_threshold=0.05), 0), 1, opt)
    assert result.pruned > 0
    assert sum(m.layout.nnz for m in sparsity.layers) == sum(nnz)
    states = sparsity.split_rows(opt.state[sparsity.params[0]]["momentum_buffer"])
    for m, values, buf, mask, keep, grow, state in zip(sparsity.layers, old_values, old_buf, old_masks,
                                                       sparsity.segments.split(result.survived),
                                                       sparsity.segments.split(result.regrown), states):
        new_mask = m.layout.mask.reshape(-1)
        assert m.values.shape == (m.layout.nnz, BLOCK, BLOCK)
        assert state.shape == m.values.shape, "optimizer state has the packed shape"
        old_pos = torch.full((mask.numel(),), -1)
        old_pos[mask.reshape(-1)] = torch.arange(int(mask.sum()))
        new_pos = torch.full((mask.numel(),), -1)
        new_pos[new_mask] = torch.arange(int(new_mask.sum()))
        assert torch.equal(m.values[new_pos[keep]], values[old_pos[keep]]), "survivors keep their values"
        assert torch.equal(state[new_pos[keep]], buf[old_pos[keep]]), "survivors keep their momentum"
        assert torch.count_nonzero(m.values[new_pos[grow]]) == 0, "regrown blocks start at zero"
        assert torch.count_nonzero(state[new_pos[grow]]) == 0, "regrown blocks start with zero momentum"


def test_block_scores_are_mean_abs():
    _, _, _, sparsity = paired_models()
    m = sparsity.layers[0]
    expected = block_means(weight_to_matrix(m.to_dense()), (BLOCK, BLOCK)).reshape(-1)
    torch.testing.assert_close(sparsity.flat_scores()[: m.layout.mask.numel()], expected)


def test_dense_export_and_import_round_trip():
    _, _, blocked, sparsity = paired_models()
    exported = dense_state_dict(blocked)
    dense = WideResNet(10, 1)
    dense.load_state_dict(exported)
    x = torch.randn(2, 3, 16, 16)
    blocked.eval(), dense.eval()
    torch.testing.assert_close(dense(x), blocked(x), rtol=1e-5, atol=1e-5)
    _, _, fresh, fresh_sparsity = paired_models(seed=5)
    load_dense_state_dict(fresh, exported)
    assert [m.layout.nnz for m in fresh_sparsity.layers] == [m.layout.nnz for m in sparsity.layers]
    fresh.eval()
    torch.testing.assert_close(fresh(x), blocked(x), rtol=1e-5, atol=1e-5)
    bad = dict(exported)
    bad["group1.0.conv1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="group1.0.conv1.weight of shape"):
        load_dense_state_dict(fresh, bad)


def test_layers_the_block_does_not_tile_stay_dense_and_bad_blocks_are_refused():
    model = WideResNet(10, 1)  # residual convs 16->16, 16->16, 16->32, 32->32, 32->64, 64->64
    names = list(sparse_parameters(model))
    sparsity, dense = to_block_sparse(model, names, 32, 0.5, seed=0)
    assert dense == ["group1.0.conv1.weight", "group1.0.conv2.weight", "group2.0.conv1.weight"]
    assert len(sparsity.layers) == len(names) - 3
    with pytest.raises(ValueError, match=r"block=24 must be one of \(16, 32, 64\)"):
        to_block_sparse(WideResNet(10, 1), names, 24, 0.5, seed=0)


def test_compiled_block_model_does_not_recompile_at_each_reallocation(monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "force_parameter_static_shapes", False, raising=False)
    torch._dynamo.reset()
    counters.clear()
    _, _, blocked, sparsity = paired_models(sparsity=0.6)
    opt = sgd(blocked)
    net = torch.compile(blocked, backend="aot_eager")
    realloc = Reallocator(sparsity.segments.sizes, DPRConfig(target_pruned=5, initial_threshold=0.05), 0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    graphs = []
    for step in range(5):
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert sparsity.reallocate(realloc, step, opt).pruned > 0
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] <= 2, f"graphs compiled after each reallocation: {graphs}"
    assert graphs[-1] == graphs[1], "no recompile once the packed shapes are dynamic"
