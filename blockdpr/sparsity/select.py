"""Vectorised per-tensor selection over a flat concatenation of tensors ("segments").

Every structural decision in blockdpr (random initial structure, random regrowth, keeping the
strongest unit of a tensor, gradual magnitude pruning) is "in each tensor i, pick counts[i] units
with the smallest key". Doing it on the concatenation with two stable sorts avoids a Python loop
over tensors and any host-device sync.
"""

from __future__ import annotations

import torch


class Segments:
    """The layout of T tensors of `sizes` units laid end to end in one flat vector."""

    def __init__(self, sizes: list[int], device: torch.device | str = "cpu"):
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"segment sizes must be a non-empty list of positive ints, got {sizes}")
        self.sizes = list(sizes)
        self.device = torch.device(device)
        size_t = torch.tensor(self.sizes, dtype=torch.int64, device=self.device)
        self.size_tensor = size_t  # int64 [T]
        self.starts = torch.cumsum(size_t, 0) - size_t  # int64 [T], offset of each segment
        self.ids = torch.repeat_interleave(torch.arange(len(sizes), device=self.device), size_t,
                                           output_size=self.total)  # int64 [n]; the size given: no host sync

    @classmethod
    def joined(cls, parts: list["Segments"]) -> "Segments":
        """Several Segments end to end, made from their device tensors: unlike the constructor, no
        tensor from host data (on a GPU, a blocking copy)."""
        seg = cls.__new__(cls)
        seg.sizes = [n for p in parts for n in p.sizes]
        seg.device = parts[0].device
        seg.size_tensor = torch.cat([p.size_tensor for p in parts])
        seg.starts = torch.cumsum(seg.size_tensor, 0) - seg.size_tensor
        shifts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
        seg.ids = torch.cat([p.ids + shift for p, shift in zip(parts, shifts)])
        return seg

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)

    def count(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-segment count of True entries: bool [n] -> int64 [T], or bool [k, n] -> int64 [k, T]."""
        out = torch.zeros(*flags.shape[:-1], len(self.sizes), dtype=torch.int64, device=flags.device)
        return out.index_add_(flags.ndim - 1, self.ids, flags.to(torch.int64))

    def first_largest(self, values: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        """In each segment mark the first entry (by position) with the largest value `among` its
        True entries; nothing in a segment without any. values: float [n]; among: bool [n].
        Returns bool [n]. O(n), no sort: two segment reductions (max, then first position)."""
        dtype = torch.promote_types(values.dtype, torch.float32)
        masked = torch.where(among, values.to(dtype), float("-inf"))
        best = torch.full((len(self.sizes),), float("-inf"), dtype=dtype, device=values.device)
        best = best.scatter_reduce(0, self.ids, masked, "amax")
        positions = torch.arange(self.total, device=values.device)
        candidate = torch.where(among & (masked == best[self.ids]), positions, self.total)
        first = torch.full((len(self.sizes),), self.total, dtype=torch.int64, device=values.device)
        first = first.scatter_reduce(0, self.ids, candidate, "amin")
        return positions == first[self.ids]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the flat vector, one per segment."""
        return list(torch.split(flat, self.sizes))

    def select_smallest(self, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """In each segment i mark the counts[i] entries with the smallest key.

        keys: float [n]; entries whose key is +inf are never selected.
        counts: int64 [T] (device tensor); a count larger than the finite keys of a segment
        selects only those.
        Returns bool [n]. Ties are broken by position (stable sort), so the result is
        deterministic given the keys.
        """
        if keys.shape != (self.total,):
            raise ValueError(f"keys must have shape ({self.total},), got {tuple(keys.shape)}")
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(self.ids[order], stable=True)]  # by segment, then by key
        seg = self.ids[order]
        rank = torch.arange(self.total, device=keys.device) - self.starts[seg]
        chosen_sorted = (rank < counts.to(keys.device)[seg]) & torch.isfinite(keys[order])
        chosen = torch.zeros(self.total, dtype=torch.bool, device=keys.device)
        chosen[order] = chosen_sorted
        return chosen

    def select_random(self, eligible: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """In each segment i mark counts[i] entries drawn uniformly at random among `eligible`.

        eligible: bool [n]; counts: int64 [T]. Returns bool [n].
        """
        keys = torch.rand(self.total, generator=generator, device=eligible.device)
        keys = keys.masked_fill(~eligible, float("inf"))
        return self.select_smallest(keys, counts)


def seeded_generator(device: torch.device | str, *seeds: int) -> torch.Generator:
    """A generator on `device` seeded by a tuple such as (seed, step): reproducible, and the same
    on every data-parallel rank without communication."""
    mixed = 0
    for s in seeds:
        mixed = (mixed * 1_000_003 + int(s) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)
