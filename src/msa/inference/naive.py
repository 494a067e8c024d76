"""The PyTorch path of paged MSA attention: gathers each request's pages and applies the reference definitions.

Runs on any device; half-precision inputs are computed in float32, float64
ones in float64 (CPU inference, and the reference of the paged kernels). One request at a time, with host loops: not
for CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from msa.ops.block_gather import compute_dtype
from msa.reference import masked_softmax, support_mask


def _request_keys(cache, layer: int, request: int, seq_len: int):
    """The request's first ``seq_len`` keys, values and index keys, gathered from its pages."""
    pages = torch.tensor(cache.pages(request), dtype=torch.int64, device=cache.device)
    gather = lambda pool: pool[layer][pages].flatten(0, 1)[:seq_len].to(compute_dtype(pool.dtype))  # noqa: E731
    return gather(cache.k), gather(cache.v), gather(cache.index_k)


def paged_attention_torch(cache, layer: int, requests, prefix_lens, q_lens, q, index_q, *, topk: int,
                          softmax_scale: float):
    """Returns ``out`` ``[T, Hq, D]`` and int64 ``block_indices`` ``[T, G, min(topk, max_pages)]`` (-1 pads).

    Same definition as :func:`msa.reference.select_blocks` and
    :func:`msa.reference.sparse_attention`, for queries at positions
    ``prefix_len .. prefix_len + q_len - 1`` of each request.
    """
    block_size, n_heads, out_dtype = cache.block_size, q.shape[1], q.dtype
    q, index_q = q.to(compute_dtype(q.dtype)), index_q.to(compute_dtype(q.dtype))
    width = min(topk, cache.max_pages_per_request)
    outs, selections = [], []
    first = 0
    for request, prefix_len, q_len in zip(requests, prefix_lens, q_lens):
        seq_len = prefix_len + q_len
        k, v, index_k = _request_keys(cache, layer, request, seq_len)
        queries = slice(first, first + q_len)
        positions = torch.arange(prefix_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device) <= positions[:, None]

        logits = torch.einsum("qgd,kd->qgk", index_q[queries], index_k).masked_fill(~visible[:, None], -math.inf)
        n_blocks = math.ceil(seq_len / block_size)
        padded = torch.nn.functional.pad(logits, (0, n_blocks * block_size - seq_len), value=-math.inf)
        block_scores = padded.unflatten(-1, (n_blocks, block_size)).amax(-1)
        local = (positions // block_size)[:, None, None].expand(-1, block_scores.shape[1], 1)
        block_scores.scatter_(-1, local, math.inf)
        top_scores, top_blocks = block_scores.topk(min(width, n_blocks), dim=-1)
        block_indices = torch.full((q_len, block_scores.shape[1], width), -1, dtype=torch.int64, device=q.device)
        block_indices[..., : top_blocks.shape[-1]] = top_blocks.masked_fill(top_scores == -math.inf, -1)

        mask = support_mask(block_indices, positions, seq_len, block_size)
        repeat = n_heads // k.shape[1]
        scores = softmax_scale * torch.einsum("qhd,khd->qhk", q[queries], k.repeat_interleave(repeat, dim=1))
        probs, _ = masked_softmax(scores, mask.repeat_interleave(repeat, dim=1))
        outs.append(torch.einsum("qhk,khd->qhd", probs, v.repeat_interleave(repeat, dim=1)))
        selections.append(block_indices)
        first += q_len
    return torch.cat(outs).to(out_dtype), torch.cat(selections)
