"""The PyTorch path of paged MSA attention: reads only the selected pages of each request.

Runs on any device (CPU inference, and the reference of the paged kernels);
half-precision inputs are computed in float32, float64 ones in float64. Per
request and chunk of queries: the index logits over the request's index keys,
the selection of :func:`msa.reference.msa_attention_suffix`, then attention
over the keys of the selected pages alone, gathered per (query, group), so a
decode step reads ``topk * block_size`` keys per group instead of the whole
context. One request at a time, with host loops: not for CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from msa.fp8 import rounded
from msa.ops.backend import compute_dtype
from msa.reference import top_blocks_of_logits, masked_softmax

# Elements of a chunk's [queries, G, keys] index logits, and of its gathered [queries, G, topk * block_size, D] keys.
_CHUNK_ELEMENTS = 2**24


def _attend_pages(cache, layer: int, pages, block_indices, positions, q, scale: float) -> torch.Tensor:
    """``q`` ``[C, Hq, D]`` at ``positions`` ``[C]`` over the keys of its ``block_indices`` ``[C, G, W]`` (blocks
    of the request whose ``pages`` are given) -> ``[C, Hq, D]``."""
    n_queries, n_groups, width = block_indices.shape
    block_size = cache.block_size
    page_ids = pages[block_indices.clamp(min=0)]
    groups = torch.arange(n_groups, device=q.device)[None, :, None]
    # pool [pages, B, G, D] indexed by (page, :, group): [C, G, W, B, D]
    keys, values = (pool[layer][page_ids, :, groups].flatten(2, 3).to(q.dtype) for pool in (cache.k, cache.v))
    key_positions = block_indices[..., None] * block_size + torch.arange(block_size, device=q.device)
    visible = (block_indices[..., None] >= 0) & (key_positions <= positions[:, None, None, None])
    visible = visible.flatten(2)
    values = values.masked_fill(~visible.unsqueeze(-1), 0.0)  # a page's unwritten slots may hold anything
    logits = scale * torch.einsum("cgrd,cgld->cgrl", q.unflatten(1, (n_groups, -1)), keys)
    probs, _ = masked_softmax(logits, visible.unsqueeze(2))
    return torch.einsum("cgrl,cgld->cgrd", probs, values).flatten(1, 2)


def paged_attention_torch(cache, layer: int, requests, prefix_lens, q_lens, q, index_q, *, topk: int,
                          softmax_scale: float):
    """Returns ``out`` ``[T, Hq, D]`` and int64 ``block_indices`` ``[T, G, min(topk, max_pages)]`` (-1 pads).

    The result of :func:`msa.reference.msa_attention_suffix` for the queries
    at positions ``prefix_len .. prefix_len + q_len - 1`` of each request (with
    an FP8 index-key cache, on the FP8-rounded index keys and queries).
    """
    width = min(topk, cache.max_pages_per_request)
    compute = compute_dtype(q.dtype)
    if cache.index_scale is not None:
        index_q = rounded(index_q)
    n_groups, head_dim = cache.num_kv_heads, cache.head_dim
    out = torch.empty(q.shape, dtype=compute, device=q.device)
    block_indices = torch.empty((q.shape[0], n_groups, width), dtype=torch.int64, device=q.device)
    first = 0
    for request, prefix_len, q_len in zip(requests, prefix_lens, q_lens):
        seq_len = prefix_len + q_len
        pages = torch.tensor(cache.pages(request)[:math.ceil(seq_len / cache.block_size)], dtype=torch.int64,
                             device=cache.device)
        index_k = cache.index_keys(layer, pages)[:seq_len].to(compute)
        step = max(1, _CHUNK_ELEMENTS // (n_groups * max(seq_len, width * cache.block_size * head_dim)))
        for start in range(0, q_len, step):
            rows = slice(first + start, first + min(q_len, start + step))
            positions = torch.arange(prefix_len + start, prefix_len + start + rows.stop - rows.start, device=q.device)
            # the index scale is left out: it does not change the ranking
            logits = torch.einsum("qgd,kd->qgk", index_q[rows].to(compute), index_k)
            block_indices[rows] = top_blocks_of_logits(logits, positions, cache.block_size, width)
            out[rows] = _attend_pages(cache, layer, pages, block_indices[rows], positions, q[rows].to(compute),
                                      softmax_scale)
        first += q_len
    return out.to(q.dtype), block_indices
