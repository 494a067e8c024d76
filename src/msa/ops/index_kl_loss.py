"""``index_kl_loss``: the KL alignment loss that trains the Index Branch."""

from __future__ import annotations

import torch

from msa.ops import block_gather
from msa.ops.checks import check_block_indices, check_block_size, check_like, check_qkv, check_scale, make_layout


def index_kl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 128,
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """KL(teacher || student) on each (query, group)'s selected support, averaged over rows.

    Args:
        q: ``[B, S, Hq, D]``, k: ``[B, S, G, D]``: the Main Branch's inputs
            (after RoPE). They define the teacher and receive no gradient.
        index_q: ``[B, S, G, Di]``, index_k: ``[B, S, 1, Di]``: the Index
            Branch, the only inputs that receive gradients.
        block_indices: int32 ``[B, S, G, topk]``, the selection to align on.
        softmax_scale: Main Branch scale, default ``D ** -0.5``.
        index_softmax_scale: index logit scale, default ``Di ** -0.5``.
        cu_seqlens, max_seqlen: packed varlen layout, as in flash-attn.

    Returns:
        A float32 scalar (the dtype of the inputs when that is float64): the
        mean over all ``B * S * G`` rows of ``sum_t p log(p / r)`` where, on the
        visible keys of the selected blocks, ``p`` is the mean over the group's
        query heads of their softmax and ``r`` the softmax of the index logits.
    """
    layout = make_layout("q", q, cu_seqlens, max_seqlen)
    _, n_groups = check_qkv(layout, q, k, None)
    check_like(layout, "index_q", index_q, n_groups, None, q, "G", "Di")
    check_like(layout, "index_k", index_k, 1, index_q.shape[-1], q, "1", "Di")
    check_block_size(block_size)
    check_scale("softmax_scale", softmax_scale)
    check_scale("index_softmax_scale", index_softmax_scale)
    block_indices = check_block_indices(layout, block_indices, n_groups, block_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index_scale = index_q.shape[-1] ** -0.5 if index_softmax_scale is None else index_softmax_scale
    dtype = block_gather.compute_dtype(q.dtype)
    total = block_gather.index_kl_sum(
        *(layout.pack(x).to(dtype) for x in (q.detach(), k.detach(), index_q, index_k)), layout.pack(block_indices),
        layout.packed_cu_seqlens, block_size, scale, index_scale)
    return total / max(1, block_indices.shape[:-1].numel())
