"""``index_kl_loss``: the KL alignment loss that trains the Index Branch."""

from __future__ import annotations

import torch

from msa.ops import library
from msa.ops.backend import compute_dtype, resolve_deterministic, unsupported_reason, use_triton
from msa.ops.checks import check_like, check_lse, check_qkv, check_scale
from msa.ops.selection import Selection, layouts_of, selection_of


def index_kl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    block_indices: torch.Tensor | Selection,
    *,
    block_size: int | None = None,
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    main_lse: torch.Tensor | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """KL(teacher || student) on each (query, group)'s selected support, averaged over rows.

    Args:
        q: ``[B, S, Hq, D]``, k: ``[B, S, G, D]``: the Main Branch's inputs
            (after RoPE). They define the teacher and receive no gradient.
        index_q: ``[B, S, G, Di]``, index_k: ``[B, S, 1, Di]``: the Index
            Branch, the only inputs that receive gradients.
        block_indices: int32 ``[B, S, G, topk]``, the selection to align on,
            or a :class:`~msa.ops.selection.Selection` (as in
            :func:`sparse_attention`: not checked again, its derived
            structures shared with the attention that took it).
        block_size: tokens per key block; default 128, or the Selection's.
        softmax_scale: Main Branch scale, default ``D ** -0.5``.
        index_softmax_scale: index logit scale, default ``Di ** -0.5``.
        cu_seqlens, max_seqlen: packed varlen layout, as in flash-attn (None
            with a Selection); or ``cu_seqlens_q``, ``cu_seqlens_k``,
            ``max_seqlen_q``, ``max_seqlen_k`` for queries that are the
            suffix of longer key sequences (``k`` and ``index_k`` then hold
            the keys, as in :func:`sparse_attention`).
        main_lse: optional float32 ``[B, S, Hq]``, the LSE that
            ``sparse_attention(q, k, v, block_indices, return_lse=True)``
            returned for these same inputs; the Triton path then skips
            recomputing the teacher's normalisation. Passing any other LSE
            (e.g. of dense attention) gives a wrong loss.
        deterministic: gradients bitwise the same from run to run, as in
            :func:`sparse_attention`: the Triton path then runs a separate
            backward pass without atomics instead of the fused pass that
            computes the loss and its gradients at once (float32 atomics).
            None (default) follows ``torch.use_deterministic_algorithms``;
            True or False overrides it for this call.

    Returns:
        A float32 scalar (the dtype of the inputs when that is float64): the
        mean over all ``B * S * G`` rows of ``sum_t p log(p / r)`` where, on the
        visible keys of the selected blocks, ``p`` is the mean over the group's
        query heads of their softmax and ``r`` the softmax of the index logits.
    """
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    layout, key_layout = layouts_of(block_indices, block_size, "q", q, "k", k, varlen)
    n_heads, n_groups = check_qkv(layout, q, k, None, key_layout)
    check_like(layout, "index_q", index_q, n_groups, None, q, "G", "Di")
    check_like(key_layout, "index_k", index_k, 1, index_q.shape[-1], q, "1", "Di")
    check_scale("softmax_scale", softmax_scale)
    check_scale("index_softmax_scale", index_softmax_scale)
    deterministic = resolve_deterministic(deterministic)
    selection = selection_of(block_indices, block_size, layout, key_layout, n_groups, q.device)
    if main_lse is not None:
        check_lse(layout, "main_lse", main_lse, n_heads, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index_scale = index_q.shape[-1] ** -0.5 if index_softmax_scale is None else index_softmax_scale
    n_rows = max(1, selection.block_indices.shape[:-1].numel())
    reason = unsupported_reason(dtype=q.dtype, head_dim=q.shape[-1], index_dim=index_q.shape[-1],
                                block_size=selection.block_size, topk=selection.topk,
                                heads_per_group=n_heads // n_groups)
    with_grads = torch.is_grad_enabled() and (index_q.requires_grad or index_k.requires_grad)
    triton = use_triton("index_kl_loss", q.device, reason)
    dtype = q.dtype if triton else compute_dtype(q.dtype)
    packed = [input_layout.pack(x).to(dtype).contiguous()
              for input_layout, x in ((layout, q.detach()), (key_layout, k.detach()), (layout, index_q),
                                      (key_layout, index_k))]
    if triton:
        if main_lse is not None:
            main_lse = layout.pack(main_lse).contiguous()
        settings = (layout.packed_cu_seqlens, layout.max_seqlen, selection.block_size, scale, index_scale, main_lse)
        offsets = selection.kernel_offsets()
        keys = (offsets.cu_seqlens_k, offsets.max_seqlen_k)
        lists = selection.block_lists()  # shared with the attention when it took the same Selection
        if with_grads and not deterministic:
            total = library.triton_index_kl_fused(*packed, selection.packed(), *settings, *keys, *lists)[0]
        else:
            total = library.triton_index_kl(*packed, selection.packed(), offsets.token_starts, *settings,
                                            deterministic, offsets.token_positions, *keys, *lists)[0]
    else:
        # main_lse is float32: a float64 loss recomputes the teacher's LSE
        teacher_lse = layout.pack(main_lse).contiguous() if main_lse is not None and dtype == torch.float32 else None
        total = library.torch_index_kl(*packed, selection.tile_plan(n_heads // n_groups, q.shape[-1]),
                                       selection.block_size, scale, index_scale, teacher_lse, with_grads,
                                       deterministic)[0]
    return total / n_rows
