"""MiniMax Sparse Attention (MSA): trainable block-sparse attention on GQA.

Public API (flash-attn layouts: ``[B, S, H, D]`` or packed ``[T, H, D]`` with
int32 ``cu_seqlens``):

- :func:`select_blocks` - Index Branch: Top-k key blocks per (query, group).
- :class:`Selection` - a selection checked once, whose derived structures the ops share.
- :func:`sparse_attention` - Main Branch: exact attention over those blocks.
- :func:`index_kl_loss` - KL alignment loss that trains the Index Branch.
- :func:`dense_attention` - causal GQA attention, the baseline.
- :class:`MSAAttention` - a complete self-attention layer.
- :mod:`msa.reference` - the float64-capable PyTorch definitions of all of them.
"""

from msa import reference
from msa.nn import MSAAttention
from msa.ops import Selection, dense_attention, index_kl_loss, select_blocks, sparse_attention

__version__ = "0.1.0"
__all__ = ["MSAAttention", "Selection", "dense_attention", "index_kl_loss", "reference", "select_blocks",
           "sparse_attention"]
