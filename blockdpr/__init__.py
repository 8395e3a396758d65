"""blockdpr: dynamic parameter reallocation (Mostafa & Wang) at element and block granularity.

`blockdpr.DPR` puts it into any model and training loop (blockdpr/sparsity/dpr.py).
"""

from .sparsity.dpr import DPR, EpochSchedule

__all__ = ["DPR", "EpochSchedule"]
