"""How the initial density is spread over the sparse tensors: uniform or Erdos-Renyi-Kernel.

* ``uniform``: every tensor keeps the same fraction ``1 - s`` of its units (the paper's choice).
* ``erk`` (Evci et al. 2020, after Mocanu et al.'s Erdos-Renyi): the density of tensor l is
  proportional to ``sum(shape_l) / prod(shape_l)``, i.e. ``(n_in + n_out + k_h + k_w) /
  (n_in n_out k_h k_w)`` for a conv and ``(n_in + n_out) / (n_in n_out)`` for a linear, scaled so
  the sparse tensors hold ``(1 - s)`` of their weights in all; a tensor whose density would exceed
  1 is made dense and the scale found again over the others (as RigL's reference code does).

Densities are per tensor and apply to its units (elements, or blocks in block mode).
"""

from __future__ import annotations

import math

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """Per-tensor densities in (0, 1] with ``sum(d_l numel_l) == (1 - sparsity) sum(numel_l)``."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    numel = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    budget = (1 - sparsity) * sum(numel)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        scale = (budget - sum(numel[i] for i in dense)) / sum(raw[i] * numel[i] for i in rest)
        over = {i for i in rest if scale * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]
        dense |= over


def densities(name: str, shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """Per-tensor initial densities of distribution ``name`` (one of DISTRIBUTIONS)."""
    if name == "uniform":
        return [1 - sparsity] * len(shapes)
    if name == "erk":
        return erk_densities(shapes, sparsity)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {name!r}")
