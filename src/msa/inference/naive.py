"""The PyTorch path of paged MSA attention: gathers each request's pages and applies the reference definitions.

Runs on any device; half-precision inputs are computed in float32, float64
ones in float64 (CPU inference, and the reference of the paged kernels). One request at a time, with host loops: not
for CUDA graphs.
"""

from __future__ import annotations

import torch

from msa.fp8 import rounded
from msa.ops.block_gather import compute_dtype
from msa.reference import msa_attention_suffix


def _request_keys(cache, layer: int, request: int, seq_len: int):
    """The request's first ``seq_len`` keys, values and index keys, gathered from its pages."""
    pages = torch.tensor(cache.pages(request), dtype=torch.int64, device=cache.device)
    gather = lambda pool: pool[layer][pages].flatten(0, 1)[:seq_len].to(compute_dtype(pool.dtype))  # noqa: E731
    return gather(cache.k), gather(cache.v), cache.index_keys(layer, pages)[:seq_len].to(compute_dtype(cache.dtype))


def paged_attention_torch(cache, layer: int, requests, prefix_lens, q_lens, q, index_q, *, topk: int,
                          softmax_scale: float):
    """Returns ``out`` ``[T, Hq, D]`` and int64 ``block_indices`` ``[T, G, min(topk, max_pages)]`` (-1 pads).

    :func:`msa.reference.msa_attention_suffix` for the queries at positions
    ``prefix_len .. prefix_len + q_len - 1`` of each request (with an FP8
    index-key cache, on the FP8-rounded index keys and queries).
    """
    width = min(topk, cache.max_pages_per_request)
    compute = compute_dtype(q.dtype)
    if cache.index_scale is not None:
        index_q = rounded(index_q)
    outs, selections = [], []
    first = 0
    for request, prefix_len, q_len in zip(requests, prefix_lens, q_lens):
        k, v, index_k = _request_keys(cache, layer, request, prefix_len + q_len)
        queries = slice(first, first + q_len)
        out, block_indices = msa_attention_suffix(q[queries].to(compute), k, v, index_q[queries].to(compute), index_k,
                                                  block_size=cache.block_size, topk=width,
                                                  softmax_scale=softmax_scale)
        outs.append(out.to(q.dtype))
        selections.append(block_indices)
        first += q_len
    return torch.cat(outs), torch.cat(selections)
