"""``sparse_attention``: the Main Branch, exact softmax attention over the selected blocks."""

from __future__ import annotations

import torch

from msa.ops import library
from msa.ops.backend import compute_dtype, resolve_deterministic, unsupported_reason, use_triton
from msa.ops.checks import check_qkv, check_scale
from msa.ops.selection import Selection, layouts_of, selection_of


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor | Selection,
    *,
    block_size: int | None = None,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    deterministic: bool | None = None,
):
    """Block-sparse causal GQA attention.

    Args:
        q: ``[B, S, Hq, D]`` queries (``[T, Hq, D]`` with ``cu_seqlens``).
        k, v: ``[B, S, G, D]`` keys and values; ``Hq % G == 0`` and query head
            ``h`` reads KV head ``h // (Hq // G)``. With ``Sk >= S`` keys
            (``[B, Sk, G, D]``, or packed with ``cu_seqlens_q`` /
            ``cu_seqlens_k``) the queries are the last ``S`` positions of each
            sequence: query ``i`` sits at ``Sk - S + i`` (flash-attn's
            bottom-right causal alignment) and block ids count key blocks.
        block_indices: int32 ``[B, S, G, topk]`` from :func:`select_blocks`
            (distinct blocks, ``-1`` for unused slots), checked on every call;
            or a :class:`~msa.ops.selection.Selection`, checked once when it
            was made, which brings its block size and layout and keeps what
            the backends derive from it for the next op that takes it.
        block_size: tokens per key block (a power of two); default 128, or the
            Selection's.
        softmax_scale: default ``D ** -0.5``.
        cu_seqlens, max_seqlen: packed varlen layout, as in flash-attn (None
            with a Selection); or ``cu_seqlens_q``, ``cu_seqlens_k``,
            ``max_seqlen_q``, ``max_seqlen_k`` for queries that are the
            suffix of longer key sequences.
        return_lse: also return the float32 natural-log LSE ``[B, S, Hq]``
            (``-inf`` for a query whose listed blocks hold no visible key).
        deterministic: gradients bitwise the same from run to run, as
            flash-attn's argument. The Triton path's backward then uses no
            float32 atomics (dq from a query-outer pass, dk and dv from one
            program per key block: slower, see ``benchmarks/kernels.py
            --deterministic``); its forward is deterministic either way. The
            PyTorch path is deterministic on CPUs either way; on GPUs it then
            accumulates rows in sorted order, forward and backward (as
            ``index_add_`` does under deterministic algorithms). None
            (default) follows ``torch.use_deterministic_algorithms``; True or
            False overrides it for this call.

    Returns:
        ``out`` ``[B, S, Hq, D]`` in the dtype of ``q``: query i, head h attends
        to exactly the keys ``t <= i`` of the blocks listed for (i, group of h).
        Differentiable in q, k and v.
    """
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    layout, key_layout = layouts_of(block_indices, block_size, "q", q, "k", k, varlen)
    n_heads, n_groups = check_qkv(layout, q, k, v, key_layout)
    check_scale("softmax_scale", softmax_scale)
    deterministic = resolve_deterministic(deterministic)
    selection = selection_of(block_indices, block_size, layout, key_layout, n_groups, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    reason = unsupported_reason(dtype=q.dtype, head_dim=q.shape[-1], block_size=selection.block_size,
                                topk=selection.topk, heads_per_group=n_heads // n_groups)
    triton = use_triton("sparse_attention", q.device, reason)
    dtype = q.dtype if triton else compute_dtype(q.dtype)
    packed = [layout.pack(q).to(dtype).contiguous()] + [key_layout.pack(x).to(dtype).contiguous() for x in (k, v)]
    if triton:
        offsets = selection.kernel_offsets()
        # the backward walks the whole selection's lists: built once here when it will run, shared with the forward
        # (an inference forward in query chunks builds its own per chunk)
        with_grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        out, lse = library.triton_sparse_attention(*packed, selection.packed(), offsets.token_starts,
                                                   layout.packed_cu_seqlens, layout.max_seqlen, selection.block_size,
                                                   scale, deterministic, offsets.token_positions,
                                                   offsets.cu_seqlens_k, offsets.max_seqlen_k,
                                                   *(selection.block_lists() if with_grads else (None, None)))
    else:
        out, lse = library.torch_sparse_attention(*packed, selection.tile_plan(n_heads // n_groups, q.shape[-1]),
                                                  selection.block_size, scale, deterministic)
    out = layout.unpack(out).to(q.dtype)
    if not return_lse:
        return out
    return out, layout.unpack(lse).detach().float()
