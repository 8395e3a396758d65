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


def test_random_layout_density():
    layout = BlockLayout.random((320, 640), (32, 32), 0.1, generator=torch.Generator().manual_seed(0))
    assert 0 < layout.nnz < 60 and layout.grid == (10, 20)
    assert "nnz" in repr(layout)


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
