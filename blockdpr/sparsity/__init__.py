"""Sparse parameters and their structure: masks, the DPR reallocator, gradual magnitude pruning."""

from .element import ElementSparsity
from .structure import SparseStructure, initial_keep_count, random_structure, reallocate_structures
from .gmp import gmp_pruning_index, gmp_sparsity
from .reallocator import (DPRConfig, NonFiniteWeights, ReallocationResult, Reallocator, reallocate_together,
                          split_regrowth)
from .select import Segments, seeded_generator
from .dpr import DPR, PAPER_REALLOC_PERIODS, PAPER_TARGET_FRACTION, EpochSchedule

__all__ = [
    "DPR", "DPRConfig", "EpochSchedule", "PAPER_REALLOC_PERIODS", "PAPER_TARGET_FRACTION", "ElementSparsity", "NonFiniteWeights", "ReallocationResult", "Reallocator", "Segments", "SparseStructure",
    "random_structure", "gmp_pruning_index", "gmp_sparsity", "initial_keep_count", "reallocate_structures",
    "reallocate_together", "seeded_generator", "split_regrowth",
]
