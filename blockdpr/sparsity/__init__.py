"""Sparse parameters and their structure: masks, the DPR reallocator, gradual magnitude pruning."""

from .element import ElementSparsity
from .structure import SparseStructure, initial_keep_count, random_structure
from .gmp import gmp_pruning_index, gmp_sparsity
from .reallocator import DPRConfig, ReallocationResult, Reallocator, split_regrowth
from .select import Segments, seeded_generator

__all__ = [
    "DPRConfig", "ElementSparsity", "ReallocationResult", "Reallocator", "Segments", "SparseStructure", "random_structure",
    "gmp_pruning_index", "gmp_sparsity", "initial_keep_count", "seeded_generator", "split_regrowth",
]
