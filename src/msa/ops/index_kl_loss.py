"""``index_kl_loss``: the KL alignment loss that trains the Index Branch."""

from __future__ import annotations

import torch

from msa.ops import block_outer
from msa.ops.backend import compute_dtype, unsupported_reason, use_triton
from msa.ops.checks import (
    check_block_indices, check_block_size, check_like, check_lse, check_qkv, check_scale, make_layout,
)
from msa.varlen import token_positions


class IndexKLFunction(torch.autograd.Function):
    """Triton forward and backward of the summed row KLs, over packed contiguous tensors.

    Gradients flow to ``index_q`` and ``index_k`` only. With ``fused`` (they
    will be needed, and deterministic algorithms are off) the forward computes
    them too, for a unit upstream gradient, in the pass that computes the
    loss: the teacher is evaluated once, and the backward only scales them.
    """

    @staticmethod
    def forward(ctx, q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen, block_size, scale, index_scale,
                main_lse, fused):
        from msa import kernels

        args = (q, k, index_q, index_k, block_indices, cu_seqlens, max_seqlen, block_size, scale, index_scale,
                main_lse)
        ctx.fused = fused
        if fused:
            kl_rows, d_index_q, d_index_k = kernels.index_kl_fwd_bwd(*args)
            ctx.save_for_backward(d_index_q, d_index_k)
        else:
            kl_rows, index_lse, teacher_lse = kernels.index_kl_fwd(*args)
            ctx.save_for_backward(q, k, index_q, index_k, block_indices, cu_seqlens, teacher_lse, index_lse)
            ctx.settings = (max_seqlen, block_size, scale, index_scale)
        ctx.dtypes = (index_q.dtype, index_k.dtype)
        return kl_rows.sum()

    @staticmethod
    def backward(ctx, grad):
        from msa import kernels

        if ctx.fused:
            d_index_q, d_index_k = (x * grad for x in ctx.saved_tensors)
        else:
            q, k, index_q, index_k, block_indices, cu_seqlens, teacher_lse, index_lse = ctx.saved_tensors
            max_seqlen, block_size, scale, index_scale = ctx.settings
            token_starts = token_positions(cu_seqlens, q.shape[0])[0].int()
            d_index_q, d_index_k = kernels.index_kl_bwd(
                q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen, teacher_lse, index_lse,
                grad.float().reshape(1), block_size, scale, index_scale,
                deterministic=torch.are_deterministic_algorithms_enabled())
        return (None, None, d_index_q.to(ctx.dtypes[0]), d_index_k.to(ctx.dtypes[1])) + (None,) * 8


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
    main_lse: torch.Tensor | None = None,
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
        main_lse: optional float32 ``[B, S, Hq]``, the LSE that
            ``sparse_attention(q, k, v, block_indices, return_lse=True)``
            returned for these same inputs; the Triton path then skips
            recomputing the teacher's normalisation. Passing any other LSE
            (e.g. of dense attention) gives a wrong loss.

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
    if main_lse is not None:
        check_lse(layout, "main_lse", main_lse, q.shape[-2], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    index_scale = index_q.shape[-1] ** -0.5 if index_softmax_scale is None else index_softmax_scale
    packed = [layout.pack(x) for x in (q.detach(), k.detach(), index_q, index_k, block_indices)]
    n_rows = max(1, block_indices.shape[:-1].numel())
    reason = unsupported_reason(dtype=q.dtype, head_dim=q.shape[-1], index_dim=index_q.shape[-1], block_size=block_size,
                                topk=block_indices.shape[-1], heads_per_group=q.shape[-2] // n_groups)
    if use_triton("index_kl_loss", q.device, reason):
        if main_lse is not None:
            main_lse = layout.pack(main_lse).contiguous()
        fused = torch.is_grad_enabled() and (index_q.requires_grad or index_k.requires_grad) \
            and not torch.are_deterministic_algorithms_enabled()
        total = IndexKLFunction.apply(*(x.contiguous() for x in packed), layout.packed_cu_seqlens, layout.max_seqlen,
                                      block_size, scale, index_scale, main_lse, fused)
    else:
        dtype = compute_dtype(q.dtype)
        with_grads = torch.is_grad_enabled() and (index_q.requires_grad or index_k.requires_grad)
        # main_lse is float32: a float64 loss recomputes the teacher's LSE
        teacher_lse = layout.pack(main_lse) if main_lse is not None and dtype == torch.float32 else None
        total = block_outer.IndexKL.apply(*(x.to(dtype) for x in packed[:4]), packed[4], layout.packed_cu_seqlens,
                                          block_size, scale, index_scale, teacher_lse, with_grads)
    return total / n_rows
