"""Tests of the CIFAR10 container and of on-device batching: epoch order, normalisation, augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import load, tiny_zip  # noqa: F401 (tiny_zip: fixture)

from blockdpr.data import CIFAR10_MEAN, CIFAR10_STD, augment, augment_trials, epoch_permutation, normalize
from blockdpr.data import augmentation


def test_subset_and_to(tiny_zip, tmp_path):
    ds = load(tiny_zip, tmp_path)
    sub = ds.subset(7, None)
    assert len(sub.train_labels) == 7 and len(sub.test_labels) == 20
    assert torch.equal(sub.train_images, ds.train_images[:7])
    assert len(ds.subset(None, 0).test_images) == 0
    moved = ds.to("cpu")
    assert moved.checksum == ds.checksum and moved.train_images.device.type == "cpu"
    assert "train=30" in repr(ds)
    with pytest.raises(ValueError):
        ds.subset(-1, None)


def test_epoch_permutation():
    p = epoch_permutation(1000, seed=3, epoch=5, device="cpu")
    assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(1000))
    assert torch.equal(p, epoch_permutation(1000, 3, 5, torch.device("cpu")))
    assert not torch.equal(p, epoch_permutation(1000, 3, 6, "cpu"))
    assert not torch.equal(p, epoch_permutation(1000, 4, 5, "cpu"))


def test_normalize():
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    y = normalize(x)
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    ref = (x.permute(0, 3, 1, 2).float() - mean) / std
    torch.testing.assert_close(y, ref)
    # constant images equal to the mean normalise to zero, mean + std to one
    at_mean = torch.tensor(CIFAR10_MEAN).round().to(torch.uint8).expand(2, 32, 32, 3).contiguous()
    torch.testing.assert_close(normalize(at_mean), (at_mean.permute(0, 3, 1, 2).float() - mean) / std)
    assert normalize(at_mean).abs().max() < 0.01


def _reference_augment(images, dy, dx, flip):
    """Per-image reference: F.pad reflect, crop, flip, normalise."""
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="reflect")
    outs = []
    for i in range(images.shape[0]):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        outs.append(crop.flip(-1) if flip[i] else crop)
    x = torch.stack(outs).round().to(torch.uint8).permute(0, 2, 3, 1)
    return normalize(x.contiguous())


def test_augment_matches_reference():
    images = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (256, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    dy, dx, flip = augmentation._augment_params(256, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(out, _reference_augment(images, dy, dx, flip))
    # all nine offsets and both flip states occur
    assert set(dy.tolist()) == set(range(9)) == set(dx.tolist())
    assert 0.3 < flip.float().mean() < 0.7


def test_augment_deterministic_per_seed():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(augment(images, g), augment(images, g))  # generator advances


def test_augment_known_pattern_flips_crops_and_reflects():
    # pixel value encodes (row, col): R = 4*col, G = 4*row, B = 0
    row, col = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([col * 4, row * 4, torch.zeros_like(row)], -1).to(torch.uint8)
    images = img.expand(512, 32, 32, 3).contiguous()
    out = augment(images, torch.Generator().manual_seed(7))
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    raw = (out * std + mean).round()  # back to 0..255
    src_col = raw[:, 0] / 4  # [B, 32, 32]: source column of each output pixel
    src_row = raw[:, 1] / 4
    assert torch.all(src_col == src_col[:, :1, :])  # columns constant down each column
    step = src_col[:, 0, 16] - src_col[:, 0, 15]  # the centre never reflects
    flipped = step < 0
    assert 0.3 < flipped.float().mean() < 0.7  # real flips, about half
    dy, dx, flip = augmentation._augment_params(512, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(flipped, flip)
    # rows: source row of output row i is reflect(i + dy - 4)
    first_row = src_row[:, 0, 0]
    expected_first = (dy - 4).abs().float()
    assert torch.equal(first_row, expected_first)
    assert (first_row != 0).any()  # real crops
    # reflect padding (not edge replicate): dy = 0 gives rows 4, 3, 2, 1, 0, 1, 2, ...
    i = int(torch.nonzero(dy == 0)[0])
    assert src_row[i, :7, 0].tolist() == [4, 3, 2, 1, 0, 1, 2]
    j = int(torch.nonzero(dy == 8)[0])
    assert src_row[j, -6:, 0].tolist() == [30, 31, 30, 29, 28, 27]
    # no pixel outside 0..31 ever appears
    assert src_col.min() >= 0 and src_col.max() <= 31


def test_augment_rejects_wrong_input():
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 32, 32, 3))


def test_augmenting_trials_together_equals_each_alone():
    """augment_trials is the stacked model's input: trial t's channels hold augment(images[t], its own
    generator) exactly, whatever the other trials are."""
    images = torch.randint(0, 256, (3, 5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    together = augment_trials(images, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    alone = [augment(images[t], torch.Generator().manual_seed(s)) for t, s in enumerate((4, 5, 6))]
    assert together.shape == (5, 9, 32, 32) and together.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(together, torch.cat(alone, dim=1))
    with pytest.raises(ValueError, match="one generator per trial"):
        augment_trials(images, [torch.Generator()])
    with pytest.raises(ValueError, match=r"expected uint8 \[T, B, 32, 32, 3\]"):
        augment_trials(images[0], [torch.Generator()])
