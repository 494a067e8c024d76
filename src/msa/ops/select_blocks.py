"""``select_blocks``: the Index Branch's block selection (exp-free Top-k over max-pooled scores)."""

from __future__ import annotations

import torch

from msa.fp8 import FP8_DTYPE, check_index_dtype
from msa.ops import library
from msa.ops.backend import compute_dtype, unsupported_reason, use_triton
from msa.ops.checks import (
    check_block_size, check_int, check_like, check_scale, make_key_layout, make_layout, resolve_varlen,
)
from msa.ops.selection import Selection


def select_blocks(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    *,
    block_size: int = 128,
    topk: int = 16,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    index_dtype: torch.dtype | None = None,
    return_selection: bool = False,
):
    """Choose, per query and GQA group, the key blocks the Main Branch attends to.

    Args:
        index_q: ``[B, S, G, Di]`` index queries, one head per GQA group
            (``[T, G, Di]`` with ``cu_seqlens``).
        index_k: ``[B, S, 1, Di]`` index keys, one head shared by the groups.
            With ``Sk >= S`` keys (``[B, Sk, 1, Di]``, or packed with
            ``cu_seqlens_q`` / ``cu_seqlens_k``) the queries are the last ``S``
            positions of each sequence (flash-attn's bottom-right alignment).
        block_size: tokens per key block (a power of two).
        topk: blocks kept per (query, group), the query's local block included.
        softmax_scale: index logit scale, default ``Di ** -0.5``.
        cu_seqlens: int32 ``[n + 1]`` sequence offsets of packed inputs.
        max_seqlen: longest sequence with ``cu_seqlens`` (read from it if None).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: the packed
            layout of queries that are the suffix of longer key sequences.
        return_lse: also return the logsumexp of the index logits over the
            visible keys of the selected blocks.
        index_dtype: ``torch.float8_e4m3fn`` ranks with FP8 index vectors
            (:mod:`msa.fp8`: per-row scales; half the bytes and twice the
            matrix rate of bf16 on Hopper, a selection no longer bit-comparable
            to the bf16 one); None (default) ranks in the inputs' dtype. The
            LSE always uses the unrounded logits.
        return_selection: return a :class:`~msa.ops.selection.Selection`
            (the indices with their block size and layout, which
            :func:`sparse_attention` and :func:`index_kl_loss` take without
            checking them again) instead of the bare ``block_indices``.

    Returns:
        ``block_indices``: int32 ``[B, S, G, topk]`` (``[T, G, topk]``), block
        numbers relative to the sequence start, in the same layout in every
        backend (README, "Selection contract"): with ``local`` the block of the
        query's position, ``count = min(topk, local + 1)`` valid entries first,
        the ``count - 1`` best earlier blocks in descending score (equal scores:
        the lower block first), then ``local``; ``-1`` in the other slots (a
        Selection of them with ``return_selection``). With ``return_lse``,
        also float32 ``lse`` ``[B, S, G]``.
    """
    cu_q, max_q, cu_k, max_k = resolve_varlen(cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k)
    layout = make_layout("index_q", index_q, cu_q, max_q)
    key_layout = make_key_layout(layout, "index_k", index_k, cu_k, max_k, tail=("1", "Di"))
    check_like(key_layout, "index_k", index_k, 1, index_q.shape[-1], index_q, "1", "Di")
    check_block_size(block_size)
    check_int("topk", topk)
    check_scale("softmax_scale", softmax_scale)
    check_index_dtype(index_dtype, index_q.dtype)
    fp8 = index_dtype == FP8_DTYPE
    reason = unsupported_reason(dtype=index_q.dtype, index_dim=index_q.shape[-1], block_size=block_size, topk=topk,
                                fp8_device=index_q.device if fp8 else None)
    scale = index_q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    triton = use_triton("select_blocks", index_q.device, reason)
    dtype = index_q.dtype if triton else compute_dtype(index_q.dtype)
    with torch.no_grad():  # the selection and its LSE are not differentiable
        index_q, index_k = (input_layout.pack(x).to(dtype).contiguous()
                            for input_layout, x in ((layout, index_q), (key_layout, index_k)))
        if triton:
            # the keys' layout where the queries are the last of longer key sequences
            keys = (None, None) if key_layout is layout else (key_layout.packed_cu_seqlens, key_layout.max_seqlen)
            packed = library.triton_select_blocks(index_q, index_k, layout.packed_cu_seqlens, layout.max_seqlen,
                                                  block_size, topk, fp8, *keys)
        else:
            packed = library.torch_select_blocks(index_q, index_k, layout.packed_cu_seqlens,
                                                 key_layout.packed_cu_seqlens, block_size, topk, scale, fp8)
        selection = Selection(layout.unpack(packed), block_size, layout, key_layout, ranked=True)
        if return_lse and triton:
            offsets = selection.kernel_offsets()
            lse = library.triton_support_lse(index_q, index_k, packed, offsets.token_starts, block_size, scale,
                                             offsets.token_positions)
        elif return_lse:
            lse = library.torch_support_lse(index_q, index_k, packed, layout.packed_cu_seqlens,
                                            key_layout.packed_cu_seqlens, block_size, scale)
    result = selection if return_selection else selection.block_indices
    return (result, layout.unpack(lse).float()) if return_lse else result
