"""Element-mode masks: the structure of the WRN and the zero invariants through SGD."""

import collections

import pytest
import torch
import torch.nn.functional as F

from blockdpr.models import WideResNet, parameter_counts, sparse_parameters
from blockdpr.sparsity import DPRConfig, ElementSparsity, Reallocator, initial_keep_count
from blockdpr_kernels.testing import record_work


def test_wrn_28_2_sparse_tensors_match_the_dsr_code():
    model = WideResNet(28, 2)
    params = sparse_parameters(model)
    assert len(params) == 24
    assert sum(p.numel() for p in params.values()) == 1_451_520
    assert all(p.shape[2:] == (3, 3) for p in params.values())
    counts = parameter_counts(model, list(params), 0.9)
    assert counts["global_sparsity"] == pytest.approx(0.89, abs=0.005)


def test_he_init_std():
    model = WideResNet(28, 2)
    w = model.group3[1].conv2.weight  # 128 -> 128, 3x3
    assert w.std().item() == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.02)


def test_bad_depth_is_rejected():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 2)


def test_random_structure_keeps_the_paper_count_per_tensor():
    model = WideResNet(10, 1)
    params = sparse_parameters(model)
    sparsity = ElementSparsity.random(params, 0.9, seed=0)
    assert sparsity.nonzero_counts() == [initial_keep_count(p.numel(), 0.9) for p in params.values()]
    other = ElementSparsity.random(params, 0.9, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(sparsity.masks, other.masks))


def _sgd_steps(model, sparsity, optimizer, steps, gen):
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=gen))
        optimizer.zero_grad()
        loss.backward()
        sparsity.mask_grads_()
        optimizer.step()
        sparsity.apply_()


@pytest.mark.parametrize("keep_momentum", [False, True])
def test_masked_weights_stay_zero_and_regrown_start_at_zero(keep_momentum):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = WideResNet(10, 1)
    params = sparse_parameters(model)
    sparsity = ElementSparsity.random(params, 0.8, seed=0)
    sparsity.apply_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    realloc = Reallocator(sparsity.segments.sizes, DPRConfig(target_pruned=200, initial_threshold=0.05), seed=0)

    for round_ in range(3):
        _sgd_steps(model, sparsity, optimizer, 3, gen)
        for p, m in zip(sparsity.params, sparsity.masks):
            assert torch.count_nonzero(p[~m]) == 0, "a masked weight moved"
            if not keep_momentum:
                assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"][~m]) == 0
        before = [b.clone() for b in (optimizer.state[p]["momentum_buffer"] for p in sparsity.params)]
        total = sum(sparsity.nonzero_counts())
        result = sparsity.reallocate(realloc, step=round_, optimizer=optimizer, keep_momentum=keep_momentum)
        assert result.pruned > 0
        assert sum(sparsity.nonzero_counts()) == total
        regrown = sparsity.segments.split(result.regrown)
        survived = sparsity.segments.split(result.survived)
        for p, r, s, old in zip(sparsity.params, regrown, survived, before):
            r, s = r.view_as(p), s.view_as(p)
            buf = optimizer.state[p]["momentum_buffer"]
            assert torch.count_nonzero(p[r]) == 0, "regrown weights must start at zero"
            if keep_momentum:
                assert torch.equal(buf, old)
            else:
                assert torch.count_nonzero(buf[r]) == 0, "regrown weights must start with zero momentum"
                assert torch.equal(buf[s], old[s]), "survivors keep their momentum"


def test_regrown_weights_learn_after_reallocation():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = WideResNet(10, 1)
    sparsity = ElementSparsity.random(sparse_parameters(model), 0.9, seed=0)
    sparsity.apply_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    realloc = Reallocator(sparsity.segments.sizes, DPRConfig(target_pruned=50, initial_threshold=0.1), seed=0)
    result = sparsity.reallocate(realloc, step=0, optimizer=optimizer)
    _sgd_steps(model, sparsity, optimizer, 2, gen)
    flat = torch.cat([p.detach().reshape(-1) for p in sparsity.params])
    assert torch.count_nonzero(flat[result.regrown]) > 0


def test_prune_to_sparsity_keeps_the_largest_magnitudes():
    model = WideResNet(10, 1)
    params = sparse_parameters(model)
    dense = {n: p.detach().clone() for n, p in params.items()}
    sparsity = ElementSparsity(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
    sparsity.prune_to_sparsity(0.75)
    assert sparsity.nonzero_counts() == [initial_keep_count(p.numel(), 0.75) for p in params.values()]
    for (name, p), m in zip(params.items(), sparsity.masks):
        assert torch.count_nonzero(p[~m]) == 0
        strongest = dense[name].abs().reshape(-1).topk(int(m.sum())).indices
        assert torch.equal(m.reshape(-1).nonzero().flatten(), strongest.sort().values)


def test_mask_state_dict_round_trip_and_validation():
    model = WideResNet(10, 1)
    params = sparse_parameters(model)
    a = ElementSparsity.random(params, 0.5, seed=0)
    b = ElementSparsity.random(params, 0.5, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    bad = a.state_dict()
    bad[next(iter(bad))] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="must be bool"):
        b.load_state_dict(bad)
    with pytest.raises(ValueError, match="sparsity must be in"):
        ElementSparsity.random(params, 1.0, seed=0)


def test_a_reallocation_is_vectorised_over_tensors():
    """What a reallocation makes the device do does not grow with the number of sparse tensors (no
    Python loop over tensors issues device work), and it waits for the device once: the per-tensor
    counts come to the host, the regrowth counts r_i go back (a copy behind that sync)."""
    work = {}
    for depth in (10, 28):  # 6 and 24 sparse tensors
        torch.manual_seed(0)
        model = WideResNet(depth, 1)
        sparsity = ElementSparsity.random(sparse_parameters(model), 0.9, seed=0)
        sparsity.apply_()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()  # momentum buffers exist: their pruned entries are zeroed too
        reallocator = Reallocator(sparsity.segments.sizes, DPRConfig(50, 0.1, 0.05), seed=0)
        with record_work() as work[depth]:
            assert sparsity.reallocate(reallocator, 1, optimizer).pruned > 0
        assert work[depth].syncs == collections.Counter({"numpy": 1, "from_host": 1}), depth  # counts out, r_i back
    assert work[10].ops == work[28].ops
    assert work[28].ops["aten.sort"] == 2, "one stable sort pair, for the random regrowth"
