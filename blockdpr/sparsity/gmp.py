"""Gradual magnitude pruning (Zhu & Gupta, 2017): the compressed baseline of the DSR paper.

A trained dense model is pruned `steps` times, once every `interval_epochs` epochs from epoch 0,
each sparse tensor by magnitude to sparsity s_f * (1 - (1 - k / steps)^3) at the k-th pruning
(k = 1 .. steps), so the last pruning reaches s_f; training goes on in between (fine-tuning).
"""

from __future__ import annotations


def gmp_sparsity(k: int, final_sparsity: float, steps: int = 20) -> float:
    """Sparsity after the k-th pruning (1 <= k <= steps): s_f * (1 - (1 - k / steps) ** 3)."""
    if not 1 <= k <= steps:
        raise ValueError(f"pruning index k must be in [1, {steps}], got {k}")
    return final_sparsity * (1 - (1 - k / steps) ** 3)


def gmp_pruning_index(epoch: int, steps: int = 20, interval_epochs: int = 2) -> int | None:
    """Which pruning (1-based) happens at the start of `epoch`, or None if none does."""
    if epoch % interval_epochs or epoch // interval_epochs >= steps:
        return None
    return epoch // interval_epochs + 1
