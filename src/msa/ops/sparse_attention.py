"""``sparse_attention``: the Main Branch, exact softmax attention over the selected blocks."""

from __future__ import annotations

import torch

from msa.ops import block_outer
from msa.ops.backend import compute_dtype, unsupported_reason, use_triton
from msa.ops.checks import check_block_indices, check_block_size, check_qkv, check_scale, make_layout
from msa.varlen import token_positions


class SparseAttentionFunction(torch.autograd.Function):
    """Triton forward and backward over packed ``[T, H, D]`` contiguous tensors."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, cu_seqlens, max_seqlen, block_size, scale):
        from msa import kernels

        token_starts = token_positions(cu_seqlens, q.shape[0])[0].int()
        out, lse = kernels.sparse_attention_fwd(q, k, v, block_indices, token_starts, cu_seqlens, max_seqlen,
                                                block_size, scale)
        ctx.save_for_backward(q, k, v, out, lse, block_indices, token_starts, cu_seqlens)
        ctx.max_seqlen, ctx.block_size, ctx.scale = max_seqlen, block_size, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from msa import kernels

        q, k, v, out, lse, block_indices, token_starts, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = kernels.sparse_attention_bwd(q, k, v, out, lse, dout.contiguous(), block_indices, token_starts,
                                                  cu_seqlens, ctx.max_seqlen, ctx.block_size, ctx.scale,
                                                  deterministic=torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int = 128,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
):
    """Block-sparse causal GQA attention.

    Args:
        q: ``[B, S, Hq, D]`` queries (``[T, Hq, D]`` with ``cu_seqlens``).
        k, v: ``[B, S, G, D]`` keys and values; ``Hq % G == 0`` and query head
            ``h`` reads KV head ``h // (Hq // G)``.
        block_indices: int32 ``[B, S, G, topk]`` from :func:`select_blocks`
            (distinct blocks, ``-1`` for unused slots).
        block_size: tokens per key block (a power of two).
        softmax_scale: default ``D ** -0.5``.
        cu_seqlens, max_seqlen: packed varlen layout, as in flash-attn.
        return_lse: also return the float32 natural-log LSE ``[B, S, Hq]``
            (``-inf`` for a query whose listed blocks hold no visible key).

    Returns:
        ``out`` ``[B, S, Hq, D]`` in the dtype of ``q``: query i, head h attends
        to exactly the keys ``t <= i`` of the blocks listed for (i, group of h).
        Differentiable in q, k and v.
    """
    layout = make_layout("q", q, cu_seqlens, max_seqlen)
    _, n_groups = check_qkv(layout, q, k, v)
    check_block_size(block_size)
    check_scale("softmax_scale", softmax_scale)
    block_indices = check_block_indices(layout, block_indices, n_groups, block_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    packed = [layout.pack(x) for x in (q, k, v, block_indices)]
    reason = unsupported_reason(dtype=q.dtype, head_dim=q.shape[-1], block_size=block_size, topk=block_indices.shape[-1],
                                heads_per_group=q.shape[-2] // n_groups)
    if use_triton("sparse_attention", q.device, reason):
        out, lse = SparseAttentionFunction.apply(*(x.contiguous() for x in packed), layout.packed_cu_seqlens,
                                                 layout.max_seqlen, block_size, scale)
    else:
        dtype = compute_dtype(q.dtype)
        out, lse = block_outer.SparseAttention.apply(*(x.to(dtype) for x in packed[:3]), packed[3],
                                                     layout.packed_cu_seqlens, block_size, scale)
    out = layout.unpack(out).to(q.dtype)
    if not return_lse:
        return out
    return out, layout.unpack(lse).detach().float()
