"""How often DPR reallocates and how much each reallocation moves, for a run of any length and size.

The paper (Mostafa & Wang: WRN-28-2, 50,000 images at batch 100 = 500 iterations an epoch, 200
epochs) reallocates every 100 iterations from epoch 0, every 200 from epoch 25, 400 from 80 and
800 from 140, until epoch 190: 369 reallocations. Each aims to prune N_p = 20,000 weights, 0.138 of
WRN-28-2's 145,152 active weights at sparsity 0.9. Kept as they are, a shorter run, a training
subset or a smaller model would reallocate far less: WRN-10-1 on 10,000 images for 15 epochs made
5 reallocations, and N_p = 20,000 exceeded its 7,370 active weights, so H only rose.

`derive(active_units, iterations_per_epoch, epochs)` keeps the paper's amount of reallocation:

- the epochs at which the period changes, and the DPR stop epoch, scale with the run's epochs
  (epochs / 200, rounded half up), as every epoch of the paper's schedule does;
- a run of I iterations has r = I / 100,000 of the paper's (200 epochs x 500); each period
  scales by sqrt(r) (rounded half up, at least 1 iteration), so the run makes about
  369 x sqrt(r) reallocations. The square root splits the shortening evenly between the two
  things a reallocation schedule fixes: how long a regrown weight has to grow before the next
  prune (the period, in iterations) and how many times the structure changes (the count).
  Keeping the periods (r^0) leaves a short run almost static (15 epochs of 100 iterations: 5
  reallocations); keeping the count (r^1) would prune a 1,200-iteration run every iteration,
  before a regrown weight can grow. With sqrt: WRN-10-1 on 10,000 images for 12 epochs makes 41
  reallocations 11-88 iterations apart; the 30-epoch full-data schedule 145, 39-310 apart;
- N_p is the same fraction of the active units (weights, or blocks in block mode) as the paper's:
  20,000 / WRN-28-2's active weights at the run's sparsity (`paper_pruned_fraction`: 0.138 at 0.9,
  0.069 at 0.8) unless a fraction or an absolute count is given. An absolute N_p at or above the
  active units is refused (`target_errors`): the pruned count could never reach it.

With the paper's settings (WRN-28-2, 500 iterations an epoch, 200 epochs) this gives the paper's
periods, stop epoch and N_p = 20,000 exactly. Everything here is a pure function of its arguments,
except `active_units`, which builds the model (on the meta device) to count its sparse tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

PAPER_EPOCHS = 200
PAPER_ITERATIONS_PER_EPOCH = 500  # 50,000 training images, batch 100
PAPER_REALLOC_PERIODS = ((0, 100), (25, 200), (80, 400), (140, 800))  # (from epoch, iterations between reallocations)
PAPER_DPR_STOP = 190  # no reallocation from this epoch on
PAPER_TARGET_PRUNED = 20_000  # N_p, in weights
PAPER_DEPTH, PAPER_WIDTH = 28, 2

Periods = tuple[tuple[int, int], ...]  # ((from epoch, period in iterations), ...), first epoch 0, increasing


def scaled_epoch(epoch: int, scale: float) -> int:
    """An epoch of the paper's schedule on a schedule `scale` times as long (rounded half up)."""
    return int(math.floor(epoch * scale + 0.5))


def period_scale(epochs: int, iterations_per_epoch: int) -> float:
    """sqrt(run iterations / the paper's): the factor every reallocation period is scaled by."""
    return math.sqrt(epochs * iterations_per_epoch / (PAPER_EPOCHS * PAPER_ITERATIONS_PER_EPOCH))


def scaled_periods(epochs: int, iterations_per_epoch: int) -> Periods:
    """The paper's periods on a run of `epochs` epochs of `iterations_per_epoch` iterations: epochs
    scaled by epochs / 200, periods by period_scale (both rounded half up; periods at least 1).
    Where scaled epochs coincide the earlier (shorter) period is kept."""
    if epochs < 1 or iterations_per_epoch < 1:
        raise ValueError(f"epochs and iterations_per_epoch must be >= 1, got {epochs} and {iterations_per_epoch}")
    epoch_scale, scale = epochs / PAPER_EPOCHS, period_scale(epochs, iterations_per_epoch)
    periods: dict[int, int] = {}
    for epoch, period in PAPER_REALLOC_PERIODS:
        periods.setdefault(scaled_epoch(epoch, epoch_scale), max(1, scaled_epoch(period, scale)))
    return tuple(sorted(periods.items()))


def scaled_dpr_stop(epochs: int) -> int:
    """The paper's DPR stop epoch (190 of 200) on a run of `epochs` epochs, in [1, epochs]."""
    return min(epochs, max(1, scaled_epoch(PAPER_DPR_STOP, epochs / PAPER_EPOCHS)))


def count_reallocations(periods: Periods, iterations_per_epoch: int, epochs: int, dpr_stop: int) -> int:
    """Reallocations a run makes, by the training loop's rule: after global step g (counted from 1)
    of epoch e < dpr_stop when g is a multiple of the period in force at epoch e."""
    count = 0
    for epoch in range(min(epochs, dpr_stop)):
        period = [p for e, p in periods if e <= epoch][-1]
        first, last = epoch * iterations_per_epoch, (epoch + 1) * iterations_per_epoch
        count += last // period - first // period
    return count


@lru_cache(maxsize=64)
def active_units(depth: int, width: int, sparsity: float, block_size: int | None = None) -> int:
    """Units DPR reallocates in WRN-depth-width at `sparsity`: active weights (element mode), or
    active blocks of block_size x block_size (block mode; convs the block does not tile stay dense
    and are not counted). The count is conserved by every reallocation."""
    import torch

    from ..models import WideResNet, sparse_parameters
    from .blocks import block_grid
    from .structure import initial_keep_count

    with torch.device("meta"):
        params = sparse_parameters(WideResNet(depth, width))
    if block_size is None:
        return sum(initial_keep_count(p.numel(), sparsity) for p in params.values())
    grids = [block_grid(p.shape, (block_size, block_size)) for p in params.values()]
    return sum(initial_keep_count(g[0] * g[1], sparsity) for g in grids if g is not None)


def paper_pruned_fraction(sparsity: float) -> float:
    """The paper's N_p as a fraction of WRN-28-2's active weights at `sparsity` (0.138 at 0.9)."""
    return PAPER_TARGET_PRUNED / active_units(PAPER_DEPTH, PAPER_WIDTH, sparsity)


def default_target_pruned(depth: int, width: int, sparsity: float, block_size: int | None = None) -> int:
    """N_p when none is given: the paper's fraction (at `sparsity`) of the model's active units, at
    least 1 (20,000 on WRN-28-2 in element mode, at every sparsity)."""
    return max(1, round(paper_pruned_fraction(sparsity) * active_units(depth, width, sparsity, block_size)))


def target_errors(target_pruned: int, active: int, units: str = "weights", flag: str = "--target-pruned") -> list[str]:
    """Why an absolute N_p cannot work on `active` units (empty: it can)."""
    if target_pruned >= active:
        return [f"{flag} {target_pruned:,} is not below the {active:,} active {units} of this model: DPR could never "
                f"prune that many, its threshold would only rise (give fewer, e.g. {max(1, round(0.138 * active)):,} = "
                "0.138 of them, the paper's fraction)"]
    return []


@dataclass(frozen=True)
class ReallocationSchedule:
    """What `derive` chose for one run: its periods, stop epoch and N_p, and what they amount to."""

    periods: Periods
    dpr_stop: int
    target_pruned: int  # N_p, in units (weights or blocks)
    active_units: int
    reallocations: int  # planned reallocations (count_reallocations)

    @property
    def pruned_fraction(self) -> float:
        """N_p / active units."""
        return self.target_pruned / self.active_units

    def periods_text(self) -> str:
        """'epoch:period,...', the syntax of blockdpr.train's --realloc-periods."""
        return ",".join(f"{e}:{p}" for e, p in self.periods)


def derive(active: int, iterations_per_epoch: int, epochs: int, pruned_fraction: float | None = None,
           target_pruned: int | None = None, sparsity: float = 0.9) -> ReallocationSchedule:
    """The reallocation schedule of a run with `active` units, `iterations_per_epoch` iterations an
    epoch and `epochs` epochs (see the module docstring). N_p: `target_pruned` if given (absolute,
    checked by target_errors: ValueError), else round(pruned_fraction x active) with the paper's
    fraction at `sparsity` by default; at least 1."""
    if active < 1:
        raise ValueError(f"active units must be >= 1, got {active}")
    if target_pruned is not None:
        errors = target_errors(target_pruned, active)
        if errors:
            raise ValueError(errors[0])
        n_p = target_pruned
    else:
        fraction = paper_pruned_fraction(sparsity) if pruned_fraction is None else pruned_fraction
        if not 0 < fraction < 1:
            raise ValueError(f"the pruned fraction must be in (0, 1), got {fraction}")
        n_p = max(1, round(fraction * active))
    periods = scaled_periods(epochs, iterations_per_epoch)
    stop = scaled_dpr_stop(epochs)
    return ReallocationSchedule(periods, stop, n_p, active, count_reallocations(periods, iterations_per_epoch, epochs, stop))
