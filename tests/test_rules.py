"""SET and RigL updates (blockdpr.sparsity.rules) and the ERK distribution, against plain per-layer
transcriptions of the published rules."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blockdpr.sparsity.blocks import block_means, weight_to_matrix
from blockdpr.sparsity.distribution import densities, erk_densities
from blockdpr.sparsity.rules import cosine_drop_fraction, drop_counts, rigl_update, set_update
from blockdpr.sparsity.select import Segments, seeded_generator
from blockdpr_kernels.testing import record_work


def rigl_reference(weights, grads, masks, alpha):
    """The RigL update as its paper states it, one layer at a time (Evci et al. 2020, Algorithm 1):
    drop the floor(alpha * active) active connections of smallest |w|, grow as many of the inactive
    ones (not the just-dropped) with the largest |g|. Scores are distinct here, so no tie-breaking."""
    out = []
    for w, g, m in zip(weights, grads, masks):
        w, g, m = w.flatten(), g.flatten(), m.flatten()
        n_drop = min(math.floor(alpha * int(m.sum())), int((~m).sum()))
        active = m.nonzero().flatten()
        drop = active[torch.topk(w[active].abs(), n_drop, largest=False).indices]
        inactive = (~m).nonzero().flatten()
        grow = inactive[torch.topk(g[inactive].abs(), n_drop).indices]
        new = m.clone()
        new[drop] = False
        new[grow] = True
        out.append(new)
    return out


def random_layers(seed, shapes, density):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < density for s in shapes]
    for m in masks:
        m.view(-1)[0] = True  # never an empty tensor
    return weights, grads, masks


SHAPES = [(8, 4, 3, 3), (16, 8, 3, 3), (10, 16), (4, 4, 1, 1)]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from([0.05, 0.2, 0.6]), st.sampled_from([0.0, 0.1, 0.3, 1.0]))
def test_rigl_matches_the_per_layer_reference_on_elements(seed, density, alpha):
    weights, grads, masks = random_layers(seed, SHAPES, density)
    seg = Segments([w.numel() for w in weights])
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    survived, grown = rigl_update(seg, flat(weights).abs(), flat(grads).abs(), flat(masks), alpha,
                                  seeded_generator("cpu", seed, 1))
    expected = flat(rigl_reference(weights, grads, masks, alpha))
    assert torch.equal(survived | grown, expected)
    assert not (survived & grown).any() and not (grown & flat(masks)).any()


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.5]))
def test_rigl_matches_the_reference_on_blocks(seed, alpha):
    """Block mode: the unit is a (4 x 4) block of the [C_out, kh kw C_in] matrix, scored by mean |w|
    and mean |g|; the reference runs on the block-mean grids as its 'layers'."""
    shapes, block = [(8, 4, 3, 3), (16, 8, 3, 3), (8, 16)], (4, 4)
    weights, grads, _ = random_layers(seed, shapes, 1.0)
    w_grid = [block_means(weight_to_matrix(w), block) for w in weights]
    g_grid = [block_means(weight_to_matrix(g), block) for g in grads]
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(w.shape, generator=gen) < 0.3 for w in w_grid]
    for m in masks:
        m.view(-1)[0] = True
    seg = Segments([w.numel() for w in w_grid])
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    survived, grown = rigl_update(seg, flat(w_grid), flat(g_grid), flat(masks), alpha, seeded_generator("cpu", 0))
    assert torch.equal(survived | grown, flat(rigl_reference(w_grid, g_grid, masks, alpha)))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from([0.05, 0.3, 0.9]), st.sampled_from([0.1, 0.3, 1.0]))
def test_set_conserves_each_tensor_and_grows_only_inactive_units(seed, density, alpha):
    weights, _, masks = random_layers(seed, SHAPES, density)
    seg = Segments([w.numel() for w in weights])
    mask = torch.cat([m.flatten() for m in masks])
    scores = torch.cat([w.flatten() for w in weights]).abs()
    survived, grown = set_update(seg, scores, mask, alpha, seeded_generator("cpu", seed, 7))
    assert torch.equal(seg.count(survived | grown), seg.count(mask))  # per-tensor counts conserved
    assert not (grown & mask).any() and torch.equal(survived, survived & mask)
    dropped = mask & ~survived
    assert torch.equal(seg.count(dropped), drop_counts(seg, mask, alpha))
    # what is dropped is the smallest of each tensor's active units
    for d, s, sc in zip(seg.split(dropped), seg.split(survived), seg.split(scores)):
        if d.any() and s.any():
            assert sc[d].max() <= sc[s].min()
    # the same (seed, step) gives the same draw; another step another
    again = set_update(seg, scores, mask, alpha, seeded_generator("cpu", seed, 7))
    assert torch.equal(again[1], grown)


def test_drop_counts_never_exceed_the_free_units():
    seg = Segments([10, 10, 10])
    mask = torch.zeros(30, dtype=torch.bool)
    mask[:9] = True      # tensor 0: 9 active, 1 free
    mask[10:12] = True   # tensor 1: 2 active
    mask[20:30] = True   # tensor 2: dense, nothing free
    assert drop_counts(seg, mask, 0.5).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="alpha"):
        drop_counts(seg, mask, 1.5)


def test_ties_in_the_gradient_are_broken_by_the_seeded_generator():
    seg = Segments([6])
    mask = torch.tensor([True, True, False, False, False, False])
    scores = torch.tensor([1.0, 2.0, 0, 0, 0, 0])
    grads = torch.zeros(6)  # every inactive unit ties
    picks = {tuple(rigl_update(seg, scores, grads, mask, 0.5, seeded_generator("cpu", s))[1].tolist())
             for s in range(20)}
    assert len(picks) > 1  # not always the first by position
    one = rigl_update(seg, scores, grads, mask, 0.5, seeded_generator("cpu", 3))[1]
    assert torch.equal(one, rigl_update(seg, scores, grads, mask, 0.5, seeded_generator("cpu", 3))[1])


def test_updates_make_no_host_sync_and_their_op_count_is_independent_of_the_tensor_count():
    def work(n_tensors, rule):
        seg = Segments([50] * n_tensors)
        g = torch.Generator().manual_seed(0)
        scores, grads = torch.rand(seg.total, generator=g), torch.rand(seg.total, generator=g)
        mask = torch.rand(seg.total, generator=g) < 0.3
        with record_work() as w:
            if rule == "set":
                set_update(seg, scores, mask, 0.3, seeded_generator("cpu", 0))
            else:
                rigl_update(seg, scores, grads, mask, 0.3, seeded_generator("cpu", 0))
        return w
    for rule in ("set", "rigl"):
        few, many = work(3, rule), work(40, rule)
        assert not few.syncs and not many.syncs, (few.syncs, many.syncs)
        assert few.ops == many.ops


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0 and cosine_drop_fraction(150, 0.3, 100) == 0.0


def test_erk_holds_the_budget_scales_by_shape_and_caps_at_dense():
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    for s in (0.5, 0.8, 0.9, 0.99):
        d = erk_densities(shapes, s)
        numel = [math.prod(x) for x in shapes]
        assert sum(di * n for di, n in zip(d, numel)) == pytest.approx((1 - s) * sum(numel))
        assert all(0 < di <= 1 for di in d)
        raw = [sum(x) / math.prod(x) for x in shapes]
        sparse = [i for i, di in enumerate(d) if di < 1]
        ratios = [d[i] / raw[i] for i in sparse]
        assert max(ratios) == pytest.approx(min(ratios))  # one scale over the non-dense tensors
    assert erk_densities(shapes, 0.5)[0] == 1.0  # the small first conv would exceed 1: dense
    assert densities("uniform", shapes, 0.9) == [pytest.approx(0.1)] * 4
    with pytest.raises(ValueError, match="distribution"):
        densities("er", shapes, 0.9)
