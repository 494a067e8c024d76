"""Public MSA operations: validation, dispatch and autograd over the implementations."""

from msa.ops.dense_attention import dense_attention
from msa.ops.index_kl_loss import index_kl_loss
from msa.ops.select_blocks import select_blocks
from msa.ops.selection import Selection
from msa.ops.sparse_attention import sparse_attention

__all__ = ["Selection", "dense_attention", "index_kl_loss", "select_blocks", "sparse_attention"]
