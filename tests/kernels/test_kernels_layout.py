"""BlockLayout: index tensors, packed <-> dense conversion, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blockdpr_kernels import BlockLayout, from_dense, to_dense
from blockdpr_kernels.layout import density_bucket, wgrad_group


@st.composite
def masks(draw):
    nb, kb = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bits = draw(st.lists(st.booleans(), min_size=nb * kb, max_size=nb * kb))
    return torch.tensor(bits, dtype=torch.bool).reshape(nb, kb)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(masks(), st.sampled_from([(1, 1), (2, 3), (16, 32)]))
def test_layout_indices_match_loop_oracle(mask, block):
    layout = BlockLayout(mask, block)
    nb, kb = mask.shape
    blocks = [(n, k) for n in range(nb) for k in range(kb) if mask[n, k]]  # row-major = packed order
    assert layout.nnz == len(blocks)
    assert layout.shape == (nb * block[0], kb * block[1]) and layout.grid == (nb, kb)
    for t in (layout.row_ptr, layout.col_idx, layout.row_idx, layout.col_ptr, layout.col_row_idx, layout.col_perm):
        assert t.dtype == torch.int32 and t.device == mask.device
    assert layout.row_idx.tolist() == [n for n, _ in blocks]
    assert layout.col_idx.tolist() == [k for _, k in blocks]
    assert layout.row_ptr.tolist() == [sum(1 for n, _ in blocks if n < r) for r in range(nb + 1)]
    assert layout.col_ptr.tolist() == [sum(1 for _, k in blocks if k < c) for c in range(kb + 1)]
    col_view = sorted(range(len(blocks)), key=lambda i: (blocks[i][1], blocks[i][0]))
    assert layout.col_perm.tolist() == col_view
    assert layout.col_row_idx.tolist() == [blocks[i][0] for i in col_view]
    assert layout.row_prefix.dtype == torch.int32 and layout.row_prefix.shape == (nb, kb + 1)
    assert layout.row_prefix.tolist() == [[sum(1 for m, k in blocks if m < n or (m == n and k < c))
                                           for c in range(kb + 1)] for n in range(nb)]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(masks(), st.sampled_from([(2, 3), (16, 16)]))
def test_pack_unpack_roundtrip(mask, block):
    layout = BlockLayout(mask, block)
    dense = torch.randn(layout.shape)
    values = layout.pack(dense)
    assert values.shape == (layout.nnz, *block) and values.is_contiguous()
    keep = mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    torch.testing.assert_close(layout.unpack(values), dense * keep)
    torch.testing.assert_close(to_dense(values, layout), dense * keep)
    values2, layout2 = from_dense(dense * keep, block)
    assert torch.equal(layout2.mask, layout2.mask & mask)  # blocks that are all zero are dropped
    torch.testing.assert_close(layout2.unpack(values2), dense * keep)


def test_empty_and_full_layouts():
    empty = BlockLayout(torch.zeros(3, 2, dtype=torch.bool), (16, 16))
    assert empty.nnz == 0 and empty.row_ptr.tolist() == [0, 0, 0, 0] and empty.col_ptr.tolist() == [0, 0, 0]
    assert torch.equal(empty.unpack(torch.zeros(0, 16, 16)), torch.zeros(48, 32))
    full = BlockLayout(torch.ones(3, 2, dtype=torch.bool), (16, 16))
    assert full.nnz == 6 and full.row_ptr.tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.33, 1.0])
def test_random_layout_keeps_exactly_round_density_times_blocks(density):
    layouts = [BlockLayout.random((192, 96), (32, 16), density, generator=torch.Generator().manual_seed(seed))
               for seed in (0, 0, 1)]
    assert all(layout.nnz == round(density * 36) for layout in layouts) and layouts[0].grid == (6, 6)
    assert torch.equal(layouts[0].mask, layouts[1].mask), "seeded: the same generator seed, the same layout"
    if 0 < density < 1:
        assert not torch.equal(layouts[0].mask, layouts[2].mask)
    assert "nnz" in repr(layouts[0])


def test_random_layout_positions_are_uniform():
    """Each block is kept round(d * blocks) / blocks of the time: over 400 seeds, no position is favoured."""
    counts = sum(BlockLayout.random((64, 96), (16, 16), 0.25, generator=torch.Generator().manual_seed(s)).mask.int()
                 for s in range(400))
    assert counts.sum() == 400 * 6  # 6 of 24 blocks each time
    assert counts.min() > 60 and counts.max() < 140  # mean 100, sd ~8.7


def test_random_layout_bad_density():
    with pytest.raises(ValueError, match=r"density: expected a fraction of blocks kept in \[0, 1\], got 1.5"):
        BlockLayout.random((64, 64), (16, 16), 1.5)


def test_mask_is_a_copy_editing_it_changes_nothing():
    source = torch.tensor([[True, False, True], [True, True, True]])
    layout = BlockLayout(source, (16, 16))
    source[0, 0] = False  # the caller's tensor: the layout took its own copy
    mask = layout.mask
    mask[0, 1] = True
    layout.mask[1, 1] = False
    assert layout.mask.tolist() == [[True, False, True], [True, True, True]]
    assert int(layout.mask.sum()) == layout.nnz == 5 and layout.mask is not layout.mask


def test_layout_bad_input():
    with pytest.raises(TypeError, match="mask"):
        BlockLayout(torch.ones(2, 2), (16, 16))
    with pytest.raises(TypeError, match="mask"):
        BlockLayout(torch.ones(2, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match="block"):
        BlockLayout(torch.ones(2, 2, dtype=torch.bool), (0, 16))
    with pytest.raises(ValueError, match="dense"):
        BlockLayout.from_dense(torch.ones(20, 32), (16, 16))
    layout = BlockLayout(torch.ones(2, 2, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match="dense: expected shape"):
        layout.pack(torch.ones(32, 48))
    with pytest.raises(ValueError, match=r"values: expected packed shape"):
        layout.unpack(torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="values: expected device"):
        layout.unpack(torch.ones(4, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="block"):
        from_dense(torch.ones(32, 32), (16, 32), layout=layout)


@pytest.mark.parametrize("g,bk", [(1, 64), (2, 32), (4, 16)])
def test_weight_grad_groups(g, bk):
    """The layout's runs of up to g = 64 // bk blocks of one block row, one weight-gradient program each."""
    counts = torch.tensor([5, 0, 9, 3, 1, 0, 4])
    mask = torch.arange(10)[None, :] < counts[:, None]  # row r keeps its first counts[r] blocks
    layout = BlockLayout(mask, (16, bk))
    assert wgrad_group(bk) == g
    groups = layout.wgrad_groups
    nnz = int(counts.sum())
    assert groups.dtype == torch.int32 and groups.shape == (nnz // g + len(counts) + 1, 2)
    first = [int(counts[:r].sum()) for r in range(len(counts))]
    expected = [(first[r] + i, first[r] + min(i + g, int(counts[r])))
                for r in range(len(counts)) for i in range(0, int(counts[r]), g)]
    assert [tuple(t) for t in groups[:len(expected)].tolist()] == expected
    assert groups[len(expected):].eq(0).all(), "unused rows are empty runs"


def test_density_bucket():
    assert [density_bucket(nnz, 20) for nnz in (0, 20, 60, 360, 3600)] == [0, 1, 2, 5, 8]
