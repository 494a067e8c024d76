"""Triton kernels of MSA and their launchers (no autograd, no validation: see :mod:`msa.ops`).

Each kernel file holds its kernels, their launchers and their tuned launch
configurations (frozen dataclasses, passed to the launchers as ``config``;
without one, each launcher takes the default its chooser picks by shape and
device); :mod:`msa.kernels.tiles` holds what several of them share.

- :mod:`~msa.kernels.indexer`: ``select_blocks`` (block scores, then
  ``top_blocks``), ``support_lse``; ``IndexerConfig``, ``TopBlocksConfig``.
- :mod:`~msa.kernels.sparse_attention`: ``sparse_attention_fwd`` /
  ``_lse`` / ``_bwd``, ``merge_partials``; ``KVOuterConfig``,
  ``SparseForwardConfig``, ``SparseBackwardConfig``.
- :mod:`~msa.kernels.sparse_attention_hopper`: the forward partials in Gluon
  for sm_90, which ``sparse_attention_fwd`` runs where it can.
- :mod:`~msa.kernels.index_kl`: ``index_kl_fwd`` / ``_bwd`` / ``_fwd_bwd``;
  ``IndexKLConfig``.
- :mod:`~msa.kernels.block_csr`: the (group, block) -> selecting entries
  lists of the KV-outer kernels: ``invert_selection`` (``BlockCSR``), and
  ``block_lists`` (the same from an operator's tensors).
- :mod:`~msa.kernels.paged`: the launchers of :mod:`msa.inference` (cache
  append, index scan, Top-k, sparse attention over a paged KV cache);
  ``PagedScanConfig``, ``TopPagesConfig``, ``PagedAttentionConfig``.
"""

from msa.kernels.block_csr import BlockCSR, block_lists, invert_selection
from msa.kernels.index_kl import IndexKLConfig, index_kl_bwd, index_kl_fwd, index_kl_fwd_bwd
from msa.kernels.indexer import (
    IndexerConfig,
    TopBlocksConfig,
    indexer_config,
    select_blocks,
    support_lse,
    top_blocks,
    top_blocks_config,
)
from msa.kernels.paged import (
    PAGED_ATTENTION_TOKENS,
    PAGED_MAX_SPLIT,
    PAGED_SCAN_TOKENS,
    PagedAttentionConfig,
    PagedScanConfig,
    TopPagesConfig,
    paged_append,
    paged_attention_config,
    paged_block_lists_numel,
    paged_block_scores,
    paged_scan_config,
    paged_sparse_attention,
    top_pages,
    top_pages_candidates_numel,
    top_pages_config,
)
from msa.kernels.sparse_attention import (
    KVOuterConfig,
    SparseBackwardConfig,
    SparseForwardConfig,
    merge_partials,
    sparse_attention_bwd,
    sparse_attention_fwd,
    sparse_attention_lse,
)
from msa.kernels.tiles import sm_count

__all__ = [
    "PAGED_ATTENTION_TOKENS", "PAGED_MAX_SPLIT", "PAGED_SCAN_TOKENS",
    "BlockCSR", "IndexKLConfig", "IndexerConfig", "KVOuterConfig", "PagedAttentionConfig", "PagedScanConfig",
    "SparseBackwardConfig", "SparseForwardConfig", "TopBlocksConfig", "TopPagesConfig",
    "block_lists", "index_kl_bwd", "index_kl_fwd", "index_kl_fwd_bwd", "indexer_config", "invert_selection",
    "merge_partials", "paged_append",
    "paged_attention_config", "paged_block_lists_numel", "paged_block_scores", "paged_scan_config",
    "paged_sparse_attention", "select_blocks", "sm_count", "sparse_attention_bwd", "sparse_attention_fwd",
    "sparse_attention_lse", "support_lse", "top_blocks", "top_blocks_config", "top_pages", "top_pages_candidates_numel",
    "top_pages_config",
]
