"""blockdpr_kernels: block-sparse linear and conv2d kernels in Triton, with a plain-torch fallback.

Stand-alone: imports only torch (and triton when installed). See README.md.
"""
from .layout import BlockLayout, from_dense, to_dense
from .nn import BlockSparseConv2d, BlockSparseLinear
from .ops import BACKENDS, CONV_BLOCKS, HAS_TRITON, LINEAR_BLOCKS, block_sparse_conv2d, block_sparse_linear
from .storage import PackedStorage

__all__ = [
    "BlockLayout", "from_dense", "to_dense",
    "block_sparse_linear", "block_sparse_conv2d",
    "BlockSparseConv2d", "BlockSparseLinear", "PackedStorage",
    "BACKENDS", "LINEAR_BLOCKS", "CONV_BLOCKS", "HAS_TRITON",
]
__version__ = "0.1.0"
