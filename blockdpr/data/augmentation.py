"""On-device batching and augmentation: the epoch order, normalisation and the random
crop / flip of a batch, each vectorised over the batch and seeded by explicit generators."""

from __future__ import annotations

import functools
import hashlib

import torch

from .dataset import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SHAPE


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """int64 ``[n]`` permutation of ``0..n-1``, a function of ``(seed, epoch)`` only.

    Generated on the CPU (so it is the same on every device type), then moved.
    """
    digest = hashlib.sha256(f"blockdpr-permutation:{seed}:{epoch}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(n, generator=g, dtype=torch.int64).to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 32, 32, 3]`` -> float32 ``[B, 3, 32, 32]``, (x - mean) / std per channel,
    in channels_last memory format (on the input's device)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return _normalized(images)


def _normalized(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3k]`` (k images side by side along channels) -> float32 ``[B, 3k, H, W]``
    channels_last, every RGB triple normalised as :func:`normalize` does."""
    k = images.shape[-1] // 3
    mean, inv_std = _channel_constants(images.device)
    # permute of a contiguous NHWC tensor already has channels_last strides
    x = images.permute(0, 3, 1, 2).float().unflatten(1, (k, 3))  # [B, k, 3, H, W]
    return ((x - mean) * inv_std).flatten(1, 2).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def _channel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and 1 / std, float32 [3, 1, 1] on `device`, made once per device: a tensor
    made from host data is a blocking copy on a GPU (it waits for the stream), and a CUDA graph
    cannot capture it."""
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, 1.0 / torch.tensor(CIFAR10_STD, dtype=torch.float32, device=device).view(3, 1, 1)


_PAD = 4


def _augment_params(batch: int, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """Random crop offsets ``dy, dx`` in ``0..8`` (into the 40x40 padded image) and flip
    flags, each int64/bool ``[batch]``, drawn in this order from ``generator``."""
    dy = torch.randint(0, 2 * _PAD + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * _PAD + 1, (batch,), generator=generator, device=device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return dy, dx, flip


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a batch, entirely on ``images.device``, no per-image loop.

    uint8 ``[B, 32, 32, 3]`` -> float32 ``[B, 3, 32, 32]`` (channels_last), equal to:
    reflect-pad by 4 pixels, take a random 32x32 crop, flip horizontally with
    probability 1/2, then :func:`normalize`.  ``generator`` must live on the same
    device; the result is deterministic given its state.  Implemented as one gather
    with per-image row/column indices (reflection folded into the indices).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"expected uint8 [B, 32, 32, 3], got {images.dtype} {tuple(images.shape)}")
    return augment_trials(images[None], [generator])


def augment_trials(images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """:func:`augment` of T trials' batches at once, the input of a stacked model.

    uint8 ``[T, B, 32, 32, 3]`` -> float32 ``[B, T * 3, 32, 32]`` (channels_last): channels 3t..3t+2
    hold ``augment(images[t], generators[t])`` exactly. Each trial draws its crops and flips from
    its own generator (its data never depends on the trials beside it); the gather, the layout
    change and the normalisation are one op each for all trials.
    """
    if images.dtype != torch.uint8 or images.ndim != 5 or tuple(images.shape[2:]) != IMAGE_SHAPE:
        raise ValueError(f"expected uint8 [T, B, 32, 32, 3], got {images.dtype} {tuple(images.shape)}")
    if len(generators) != images.shape[0]:
        raise ValueError(f"expected one generator per trial ({images.shape[0]}), got {len(generators)}")
    trials, b, h, w, _ = images.shape
    device = images.device
    draws = [_augment_params(b, g, device) for g in generators]
    dy, dx, flip = (d[0] if trials == 1 else torch.cat(d) for d in zip(*draws))  # [T * B] each
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    # padded coordinate p = i + offset maps to source p - PAD, reflected into [0, size)
    rows = (ar_h[None, :] + dy[:, None] - _PAD).abs()
    rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)  # [T * B, 32]
    cols = (ar_w[None, :] + dx[:, None] - _PAD).abs()
    cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)  # [T * B, 32]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(trials * b, device=device)[:, None, None]
    out = images.reshape(trials * b, h, w, 3)[batch_idx, rows[:, :, None], cols[:, None, :]]  # uint8 [T * B, 32, 32, 3]
    side_by_side = out.view(trials, b, h, w, 3).permute(1, 2, 3, 0, 4).reshape(b, h, w, trials * 3)
    return _normalized(side_by_side)
