"""``dense_attention``: causal GQA attention, the baseline MSA is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msa import reference
from msa.ops.backend import compute_dtype
from msa.ops.checks import check_qkv, check_scale, make_layout


def _sdpa(q, k, v, scale):
    """``[S, H, D]`` or ``[B, S, H, D]`` through PyTorch's fused kernels (cuDNN / FlashAttention on GPUs)."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         is_causal=True, scale=scale, enable_gqa=True)
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
):
    """Causal GQA attention with the layouts of :func:`sparse_attention`.

    Without ``return_lse`` it runs ``torch.nn.functional.scaled_dot_product_attention``
    (cuDNN or FlashAttention-2 on GPUs, per sequence for varlen inputs); with it,
    the chunked PyTorch path, which also returns the float32 LSE ``[B, S, Hq]``.
    """
    layout = make_layout("q", q, cu_seqlens, max_seqlen)
    check_qkv(layout, q, k, v)
    check_scale("softmax_scale", softmax_scale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if return_lse:
        dtype = compute_dtype(q.dtype)
        out, lse = reference.dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), softmax_scale=scale,
                                             cu_seqlens=cu_seqlens, return_lse=True)
        return out.to(q.dtype), lse.detach().float()
    if not layout.varlen:
        return _sdpa(q, k, v, scale)
    bounds = cu_seqlens.tolist()
    return torch.cat([_sdpa(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(bounds[:-1], bounds[1:])])
