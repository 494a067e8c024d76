"""``dense_attention``: causal GQA attention, the baseline MSA is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from msa import reference
from msa.ops.backend import compute_dtype
from msa.ops.checks import check_qkv, check_scale, make_key_layout, make_layout, resolve_varlen


def _sdpa(q, k, v, scale):
    """``[S, H, D]`` or ``[B, S, H, D]`` queries, the last of the ``Sk`` keys (bottom-right causal alignment),
    through PyTorch's fused kernels (cuDNN / FlashAttention on GPUs)."""
    n_queries, n_keys = q.shape[-3], k.shape[-3]
    causal = dict(is_causal=True) if n_queries == n_keys else dict(attn_mask=causal_lower_right(n_queries, n_keys))
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         scale=scale, enable_gqa=True, **causal)
    return out.transpose(-3, -2)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
):
    """Causal GQA attention with the layouts of :func:`sparse_attention` (queries may be the suffix of longer key
    sequences: ``k``, ``v`` ``[B, Sk, G, D]``, or ``cu_seqlens_q`` / ``cu_seqlens_k``).

    Without ``return_lse`` it runs ``torch.nn.functional.scaled_dot_product_attention``
    (cuDNN or FlashAttention-2 on GPUs, per sequence for varlen inputs); with it,
    the chunked PyTorch path, which also returns the float32 LSE ``[B, S, Hq]``.
    """
    cu_q, max_q, cu_k, max_k = resolve_varlen(cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k)
    layout = make_layout("q", q, cu_q, max_q)
    key_layout = make_key_layout(layout, "k", k, cu_k, max_k)
    check_qkv(layout, q, k, v, key_layout)
    check_scale("softmax_scale", softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if return_lse:
        dtype = compute_dtype(q.dtype)
        out, lse = reference.dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), softmax_scale=scale,
                                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
        return out.to(q.dtype), lse.detach().float()
    if not layout.varlen:
        return _sdpa(q, k, v, scale)
    query_bounds, key_bounds = cu_q.tolist(), cu_k.tolist()
    return torch.cat([_sdpa(q[a:b], k[c:d], v[c:d], scale)
                      for a, b, c, d in zip(query_bounds[:-1], query_bounds[1:], key_bounds[:-1], key_bounds[1:])])
