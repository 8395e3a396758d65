"""Invariants of Algorithm 1 (the DPR reallocator) and of per-segment selection."""

import collections

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blockdpr.sparsity import (DPRConfig, NonFiniteWeights, Reallocator, Segments, gmp_pruning_index, gmp_sparsity,
                               reallocate_together, split_regrowth)
from blockdpr_kernels.testing import record_work


@st.composite
def segment_problem(draw):
    sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=6))
    n = sum(sizes)
    keys = draw(st.lists(st.floats(-5, 5, allow_nan=False) | st.just(float("inf")), min_size=n, max_size=n))
    counts = [draw(st.integers(0, s + 2)) for s in sizes]
    return sizes, torch.tensor(keys, dtype=torch.float64), torch.tensor(counts)


@given(segment_problem())
@settings(max_examples=200, deadline=None)
def test_select_smallest_matches_per_tensor_sort(problem):
    sizes, keys, counts = problem
    chosen = Segments(sizes).select_smallest(keys, counts)
    for seg_keys, seg_chosen, count in zip(torch.split(keys, sizes), torch.split(chosen, sizes), counts.tolist()):
        finite = torch.isfinite(seg_keys)
        expected = min(count, int(finite.sum()))
        assert int(seg_chosen.sum()) == expected
        assert not (seg_chosen & ~finite).any()
        if 0 < expected < int(finite.sum()):  # every chosen key <= every finite unchosen key
            assert seg_keys[seg_chosen].max() <= seg_keys[~seg_chosen & finite].min()


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.data())
@settings(max_examples=200, deadline=None)
def test_first_largest_marks_the_first_maximum_among_the_chosen_entries(sizes, data):
    """Values are small integers (many ties: the first position must win); a segment may have no entry."""
    n = sum(sizes)
    values = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.float32)
    among = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    marked = Segments(sizes).first_largest(values, among)
    for seg_values, seg_among, seg_marked in zip(*(torch.split(t, sizes) for t in (values, among, marked))):
        expected = torch.zeros_like(seg_among)
        if seg_among.any():
            candidates = [i for i in range(len(seg_values)) if seg_among[i]]
            expected[max(candidates, key=lambda i: (seg_values[i], -i))] = True
        assert torch.equal(seg_marked, expected)


def test_joined_segments_equal_segments_of_all_sizes_and_need_no_host_data():
    parts = [Segments([3, 1]), Segments([4]), Segments([2, 5])]
    with record_work() as work:
        joined = Segments.joined(parts)
    whole = Segments([3, 1, 4, 2, 5])
    assert not work.syncs and joined.sizes == whole.sizes and joined.total == 15
    for name in ("ids", "starts", "size_tensor"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name


def test_counting_several_flag_vectors_at_once_equals_counting_each():
    seg = Segments([3, 1, 4])
    flags = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(seg.count(flags), torch.stack([seg.count(f) for f in flags]))


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=1, max_size=30), st.integers(0, 10**6), st.data())
@settings(max_examples=300, deadline=None)
def test_split_regrowth_is_exact_and_within_capacity(pairs, seed, data):
    surviving = np.array([p[0] for p in pairs])
    free = np.array([p[1] for p in pairs])
    total = data.draw(st.integers(0, int(free.sum())))
    r = split_regrowth(surviving, free, total, np.random.default_rng(seed))
    assert r.dtype == np.int64 and r.sum() == total
    assert (r >= 0).all() and (r <= free).all()


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 50)), min_size=1, max_size=30), st.integers(1, 100))
@settings(max_examples=50, deadline=None)
def test_split_regrowth_rejects_totals_above_the_free_units(pairs, excess):
    surviving = np.array([p[0] for p in pairs])
    free = np.array([p[1] for p in pairs])
    total = int(free.sum()) + excess
    with pytest.raises(ValueError, match=f"cannot regrow {total} units: only {int(free.sum())} free"):
        split_regrowth(surviving, free, total, np.random.default_rng(0))


def test_split_regrowth_is_proportional_when_nothing_caps():
    r = split_regrowth(np.array([1000, 3000, 6000]), np.array([10**6] * 3), 10_000, np.random.default_rng(0))
    assert r.tolist() == [1000, 3000, 6000]


def test_split_regrowth_rejects_impossible_totals():
    with pytest.raises(ValueError, match="cannot regrow 11 units"):
        split_regrowth(np.array([1, 1]), np.array([5, 5]), 11, np.random.default_rng(0))


def test_split_regrowth_passes_a_capped_tensors_excess_on_in_proportion():
    # shares 2, 2, 16 (of 20); tensors 0 and 2 can take only 1 and 5, so tensor 1 takes the other 14
    r = split_regrowth(np.array([10, 10, 80]), np.array([1, 100, 5]), 20, np.random.default_rng(0))
    assert r.tolist() == [1, 14, 5]
    # the excess of a capped tensor is shared by the others in proportion to their survivors
    r = split_regrowth(np.array([10, 20, 70]), np.array([100, 100, 0]), 30, np.random.default_rng(0))
    assert r.tolist() == [10, 20, 0]


def test_split_regrowth_rounds_each_share_down_or_up():
    """The issue's example: shares are 0.72 for each small tensor and 16.8 for the large one."""
    surviving, free = np.array([3] * 10 + [70]), np.array([10**6] * 11)
    for seed in range(50):
        r = split_regrowth(surviving, free, 24, np.random.default_rng(seed))
        assert r.sum() == 24
        assert set(r[:10].tolist()) <= {0, 1} and r[10] in (16, 17), r.tolist()


def _wrn28_2_regrowth_problem():
    """Per-tensor surviving and free weights and K of a WRN-28-2 reallocation at sparsity 0.9."""
    sizes = np.array([16 * 32 * 9] + [32 * 32 * 9] * 7 + [32 * 64 * 9] + [64 * 64 * 9] * 7
                     + [64 * 128 * 9] + [128 * 128 * 9] * 7)
    active = sizes // 10
    pruned = np.round(active * 20_000 / active.sum()).astype(np.int64)
    return active - pruned, sizes - active, int(pruned.sum())


@pytest.mark.parametrize("problem", [
    (np.array([3] * 10 + [70]), np.array([10**6] * 11), 24),
    _wrn28_2_regrowth_problem(),
], ids=["issue-example", "wrn-28-2"])
def test_split_regrowth_has_no_bias_between_tensors(problem):
    """Over many reallocations each tensor gets its exact share (l_i / L) K on average."""
    surviving, free, total = problem
    exact = total * surviving / surviving.sum()
    assert (exact <= free).all(), "the capacities must not bind here"
    calls = 3000
    mean = np.mean([split_regrowth(surviving, free, total, np.random.default_rng([7, i])) for i in range(calls)], axis=0)
    bias = mean - exact
    assert np.abs(bias).max() < 0.05, f"mean bias per tensor (units per reallocation): {np.round(bias, 3).tolist()}"


def test_split_regrowth_is_unbiased_when_a_tensor_is_capped():
    """The large tensor can take only 3 of its 9.4; the other 7 are shared 1 : 2 : 3, each in expectation."""
    surviving, free, total = np.array([1, 2, 3, 94]), np.array([50, 50, 50, 3]), 10
    expected = np.append((total - 3) * surviving[:3] / surviving[:3].sum(), 3)
    rs = np.array([split_regrowth(surviving, free, total, np.random.default_rng([3, i])) for i in range(3000)])
    assert (rs[:, 3] == 3).all() and (rs.sum(axis=1) == total).all()
    assert np.abs(rs.mean(axis=0) - expected).max() < 0.05, rs.mean(axis=0)


@st.composite
def realloc_problem(draw):
    sizes = draw(st.lists(st.integers(2, 300), min_size=1, max_size=6))
    density = draw(st.floats(0.02, 0.9))
    return sizes, density, draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 200)), draw(st.floats(1e-3, 2.0))


@given(realloc_problem())
@settings(max_examples=60, deadline=None)
def test_reallocation_invariants_over_many_rounds(problem):
    """Exact conservation, no empty tensor, pruning by H, regrowth only into old zeros, in every round."""
    sizes, density, seed, target, h0 = problem
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    seg = Segments(sizes)
    mask = seg.select_random(torch.ones(n, dtype=torch.bool), torch.tensor([max(1, int(density * s)) for s in sizes]), gen)
    realloc = Reallocator(sizes, DPRConfig(target_pruned=target, initial_threshold=h0), seed)
    active = int(mask.sum())
    for step in range(40):
        scores = torch.rand(n, generator=gen) * mask  # inactive units have magnitude 0
        h = realloc.threshold
        result = realloc.reallocate(scores, mask, step)
        new = result.mask
        assert int(new.sum()) == active, "active count must be conserved exactly"
        assert (seg.count(new) >= 1).all(), "no tensor may be emptied"
        pruned = mask & ~result.survived
        assert bool((scores[pruned] < h).all()), "only units below H are pruned"
        kept_below = result.survived & (scores < h)
        assert int(kept_below.sum()) <= len(sizes), "at most one unit per tensor survives below H"
        if int((~mask).sum()) >= result.pruned:
            assert not (result.regrown & mask).any(), "regrowth only into units that were inactive"
        assert not (result.survived & result.regrown).any()
        assert result.regrown_per_tensor.tolist() == seg.count(result.regrown).tolist()
        assert result.pruned == int(pruned.sum()) == int(result.regrown.sum())
        mask = new


def test_thousands_of_reallocations_conserve_count():
    sizes = [432, 1152, 2304, 4608]
    seg = Segments(sizes)
    gen = torch.Generator().manual_seed(1)
    mask = seg.select_random(torch.ones(seg.total, dtype=torch.bool), torch.tensor([s // 10 for s in sizes]), gen)
    active = int(mask.sum())
    realloc = Reallocator(sizes, DPRConfig(target_pruned=100), seed=3)
    for step in range(2000):
        result = realloc.reallocate(torch.rand(seg.total, generator=gen) * mask, mask, step)
        mask = result.mask
        assert int(mask.sum()) == active


def test_threshold_adapts_into_the_tolerance_band():
    """Uniform magnitudes: pruned count is about H * active, so H = 0.256 hits N_p = 25,600."""
    n = 200_000
    seg_sizes = [50_000, 150_000]
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(n, generator=gen) < 0.5
    cfg = DPRConfig(target_pruned=int(0.256 * int(mask.sum())), tolerance=0.1, initial_threshold=0.001)
    realloc = Reallocator(seg_sizes, cfg, seed=0)
    history = []
    for step in range(20):
        result = realloc.reallocate(torch.rand(n, generator=gen) * mask, mask, step)
        history.append(result.pruned)
        mask = result.mask
    band = [(1 - cfg.tolerance) * cfg.target_pruned, (1 + cfg.tolerance) * cfg.target_pruned]
    assert history[0] < band[0], "starting at H = 0.001 prunes too few"
    assert all(band[0] <= k <= band[1] for k in history[-8:]), history
    assert realloc.threshold == pytest.approx(0.256)


def test_threshold_halves_when_too_many_are_pruned():
    realloc = Reallocator([1000], DPRConfig(target_pruned=10, initial_threshold=0.5), seed=0)
    mask = torch.ones(1000, dtype=torch.bool)
    mask[500:] = False
    realloc.reallocate(torch.linspace(0, 1, 1000) * mask, mask, step=1)
    assert realloc.threshold == 0.25


def test_regrowth_is_random_and_seeded_by_step():
    sizes = [1000]
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:100] = True
    scores = torch.linspace(0, 1, 1000) * mask
    a = Reallocator(sizes, DPRConfig(target_pruned=10, initial_threshold=0.05), seed=7).reallocate(scores, mask, 5)
    b = Reallocator(sizes, DPRConfig(target_pruned=10, initial_threshold=0.05), seed=7).reallocate(scores, mask, 5)
    c = Reallocator(sizes, DPRConfig(target_pruned=10, initial_threshold=0.05), seed=7).reallocate(scores, mask, 6)
    assert torch.equal(a.regrown, b.regrown)
    assert not torch.equal(a.regrown, c.regrown)
    assert a.regrown[100:].any() and not a.regrown[:100].any()


def test_reallocator_rejects_bad_input():
    realloc = Reallocator([10, 10], DPRConfig(), seed=0)
    with pytest.raises(ValueError, match="shape"):
        realloc.reallocate(torch.rand(19), torch.ones(19, dtype=torch.bool), 0)
    with pytest.raises(TypeError, match="bool"):
        realloc.reallocate(torch.rand(20), torch.ones(20), 0)
    with pytest.raises(ValueError, match="target_pruned"):
        DPRConfig(target_pruned=0)


def test_gmp_schedule_is_cubic_and_ends_at_the_target():
    values = [gmp_sparsity(k, 0.9) for k in range(1, 21)]
    assert values[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.9 * (1 - 0.95**3))
    assert [gmp_pruning_index(e) for e in range(0, 6)] == [1, None, 2, None, 3, None]
    assert gmp_pruning_index(38) == 20 and gmp_pruning_index(40) is None


def test_reallocating_several_trials_together_equals_each_alone():
    """The trials of one process reallocate in one call (one host sync, one sort pair): every result,
    threshold and random draw is the one its reallocator gives alone, whatever the other trials hold."""
    problems = [([30, 50, 20], 7, 0.05), ([30, 50, 20], 8, 0.2), ([64, 3], 9, 0.01)]  # (sizes, seed, initial H)
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for sizes, _, _ in problems:
        n = sum(sizes)
        mask = torch.rand(n, generator=gen) < 0.4
        inputs.append((torch.rand(n, generator=gen) * mask, mask))

    def reallocators():
        return [Reallocator(sizes, DPRConfig(target_pruned=6, initial_threshold=h), seed) for sizes, seed, h in problems]
    alone = [r.reallocate(scores, mask, 11) for r, (scores, mask) in zip(reallocators(), inputs)]
    together_reallocators = reallocators()
    with record_work() as work:
        together = reallocate_together(together_reallocators, *zip(*inputs), step=11)
    assert work.syncs == collections.Counter({"numpy": 1, "from_host": 1}) and work.ops["aten.sort"] == 2
    for a, b, r in zip(alone, together, together_reallocators):
        assert torch.equal(a.survived, b.survived) and torch.equal(a.regrown, b.regrown)
        assert (a.pruned_per_tensor.tolist(), a.regrown_per_tensor.tolist()) == (b.pruned_per_tensor.tolist(),
                                                                                 b.regrown_per_tensor.tolist())
        assert (a.threshold_used, a.threshold_next) == (b.threshold_used, b.threshold_next) == (a.threshold_used,
                                                                                               r.threshold)
    assert len({a.pruned for a in alone}) > 1, "the trials must differ"


def test_non_finite_scores_of_one_trial_stop_all_and_name_it():
    realloc = [Reallocator([4, 4], DPRConfig(2, 0.1, 0.5), seed=s) for s in (0, 1)]
    good = torch.tensor([1.0, 0.1, 2.0, 0.2, 1.0, 1.0, 0.1, 3.0])
    bad = good.clone()
    bad[5] = float("inf")
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(NonFiniteWeights, match=r"sparse tensors \{1: \[1\]\}") as e:
        reallocate_together(realloc, [good, bad], [mask, mask], 1)
    assert e.value.trials == [1] and [r.threshold for r in realloc] == [0.5, 0.5], "nothing changes"
