"""Block selection on the PyTorch path: max-pooled index logits by matmuls, chunk by chunk, then Top-k.

The selection of :func:`msa.reference.select_blocks`, without its ``[S, S]``
masking: a block's score matters only to queries that see the whole block
(the local block is forced in, later blocks are out), so the queries of a
chunk score the full blocks before their last query's local block with one
matmul per chunk of keys, max-pool them, and apply causality to the
``[C, G, n_blocks]`` block scores alone. The scores, their order and the
layout of the result are the reference's.
"""

from __future__ import annotations

import math

import torch

from msa import reference
from msa.fp8 import rounded

# Elements of one chunk's [queries * G, keys] logits: small enough to stay in cache while they are max-pooled.
_LOGIT_ELEMENTS = 2**18
# Queries scored together.
_QUERY_CHUNK = 256


def _block_maxima(index_q, index_k, block_size: int, n_blocks: int) -> torch.Tensor:
    """``index_q`` ``[C, G, Di]``, ``index_k`` ``[n_blocks * B, Di]`` -> ``[C, G, n_blocks]`` max logits."""
    queries = index_q.flatten(0, 1)
    maxima = index_q.new_empty(queries.shape[0], n_blocks)
    step = max(1, _LOGIT_ELEMENTS // max(1, queries.shape[0] * block_size))  # blocks per matmul
    for first in range(0, n_blocks, step):
        last = min(n_blocks, first + step)
        logits = queries @ index_k[first * block_size:last * block_size].T
        torch.amax(logits.view(queries.shape[0], last - first, block_size), dim=-1, out=maxima[:, first:last])
    return maxima.view(*index_q.shape[:2], n_blocks)


def _select_one(rank_q, rank_k, block_size: int, topk: int, scale: float) -> torch.Tensor:
    """One sequence: ``rank_q`` ``[Sq, G, Di]``, the last queries of ``rank_k`` ``[Sk, Di]`` -> int64
    ``[Sq, G, topk]``."""
    n_queries, n_groups, _ = rank_q.shape
    offset = rank_k.shape[0] - n_queries
    block_indices = torch.empty((n_queries, n_groups, topk), dtype=torch.int64, device=rank_q.device)
    for start in range(0, n_queries, _QUERY_CHUNK):
        end = min(n_queries, start + _QUERY_CHUNK)
        earlier = (offset + end - 1) // block_size  # the blocks before the last query's local block
        scores = _block_maxima(rank_q[start:end], rank_k, block_size, earlier).mul_(scale)
        local = torch.arange(offset + start, offset + end, device=rank_q.device) // block_size
        block_indices[start:end] = reference.rank_blocks(scores, local, topk)
    return block_indices


def select_blocks(index_q, index_k, cu_seqlens, block_size: int, topk: int, scale: float, fp8: bool,
                  cu_seqlens_k=None) -> torch.Tensor:
    """int32 ``[Tq, G, topk]`` from packed ``index_q`` ``[Tq, G, Di]`` and ``index_k`` ``[Tk, 1, Di]``.

    ``cu_seqlens_k``: the keys' offsets when each sequence's queries
    (``cu_seqlens``) are the last of its keys; default: the queries' own. The
    layout of :func:`msa.reference.rank_blocks`. ``fp8``: rank with the
    FP8-rounded vectors (:mod:`msa.fp8`).
    """
    rank_q, rank_k = (rounded(x).to(x.dtype) for x in (index_q, index_k)) if fp8 else (index_q, index_k)
    block_indices = torch.empty((*index_q.shape[:2], topk), dtype=torch.int32, device=index_q.device)
    query_bounds = cu_seqlens.tolist()
    key_bounds = query_bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for first, last, first_key, last_key in zip(query_bounds[:-1], query_bounds[1:], key_bounds[:-1], key_bounds[1:]):
        block_indices[first:last] = _select_one(rank_q[first:last], rank_k[first_key:last_key, 0], block_size, topk,
                                                scale)
    return block_indices
