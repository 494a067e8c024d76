"""Triton kernels of MSA and their launchers (no autograd, no validation: see :mod:`msa.ops`).

Every launcher takes packed ``[T, H, D]`` contiguous tensors, int32
``cu_seqlens`` and the per-token sequence offsets ``token_starts`` (int32
``[T]``), allocates its outputs and launches. Under ``TRITON_INTERPRET=1``
the kernels compute their matrix products in float32 (the interpreter's
bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import os

import torch
import triton

from msa.kernels.block_csr import build_block_csr
from msa.kernels.index_kl import index_kl_bwd_dk_kernel, index_kl_bwd_dq_kernel, index_kl_fwd_kernel
from msa.kernels.indexer import select_blocks_kernel, support_lse_kernel
from msa.kernels.sparse_attention import (
    LOG2E,
    sparse_attention_bwd_dkv_kernel,
    sparse_attention_bwd_dq_kernel,
    sparse_attention_fwd_kernel,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _heads(q: torch.Tensor, k: torch.Tensor) -> dict:
    n_heads, n_groups = q.shape[1], k.shape[1]
    per_group = n_heads // n_groups
    return dict(HQ=n_heads, G=n_groups, R=per_group, RP=_pow2(per_group, 16), D=q.shape[2])


def select_blocks(index_q, index_k, cu_seqlens, max_seqlen: int, block_size: int, topk: int, scale: float):
    """``index_q`` ``[T, G, Di]``, ``index_k`` ``[T, 1, Di]`` -> int32 ``[T, G, topk]``."""
    total, n_groups, index_dim = index_q.shape
    block_indices = torch.empty(total, n_groups, topk, dtype=torch.int32, device=index_q.device)
    groups_pow2 = _pow2(n_groups)
    block_m = max(1, 128 // groups_pow2)
    grid = (triton.cdiv(max(max_seqlen, 1), block_m), cu_seqlens.numel() - 1)
    select_blocks_kernel[grid](
        index_q, index_k, cu_seqlens, block_indices, scale,
        G=n_groups, GP=groups_pow2, DI=index_dim, BLOCK_SIZE=block_size, TOPK=topk, KP=_pow2(topk - 1),
        BLOCK_M=block_m, BLOCK_N=max(block_size, 64), UPCAST=INTERPRET, num_warps=8)
    return block_indices


def support_lse(index_q, index_k, block_indices, token_starts, block_size: int, scale: float):
    """Float32 ``[T, G]`` logsumexp of the index logits over each row's selected support."""
    total, n_groups, index_dim = index_q.shape
    lse = torch.empty(total, n_groups, dtype=torch.float32, device=index_q.device)
    if total:
        support_lse_kernel[(total, n_groups)](
            index_q, index_k, token_starts, block_indices, lse, scale,
            G=n_groups, DI=index_dim, BLOCK_SIZE=block_size, TOPK=block_indices.shape[-1])
    return lse


def sparse_attention_fwd(q, k, v, block_indices, token_starts, block_size: int, scale: float):
    """Returns ``out`` ``[T, Hq, D]`` (dtype of q) and float32 ``lse`` ``[T, Hq]``."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if q.shape[0]:
        sparse_attention_fwd_kernel[(q.shape[0], k.shape[1])](
            q, k, v, block_indices, token_starts, out, lse, scale * LOG2E.value,
            **_heads(q, k), BLOCK_SIZE=block_size, TOPK=block_indices.shape[-1], UPCAST=INTERPRET, num_warps=4)
    return out, lse


def sparse_attention_bwd(q, k, v, out, lse, dout, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                         block_size: int, scale: float):
    """Returns ``dq, dk, dv`` (dtypes of q, k, v); deterministic."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not q.shape[0]:
        return dq, dk, dv
    delta = (out.float() * dout.float()).sum(-1)
    heads = _heads(q, k)
    common = dict(**heads, BLOCK_SIZE=block_size, UPCAST=INTERPRET)
    sparse_attention_bwd_dq_kernel[(q.shape[0], k.shape[1])](
        q, k, v, block_indices, token_starts, dout, lse, delta, dq, scale * LOG2E.value, scale,
        TOPK=block_indices.shape[-1], **common, num_warps=4)
    csr = build_block_csr(block_indices, cu_seqlens, max_seqlen, block_size)
    sparse_attention_bwd_dkv_kernel[(csr.n_block_slots, k.shape[1])](
        q, k, v, dout, lse, delta, cu_seqlens, csr.offsets, csr.tokens, dk, dv, scale * LOG2E.value, scale,
        csr.n_block_slots, MAX_BLOCKS=csr.max_blocks, QT=max(1, 64 // heads["RP"]), **common, num_warps=8)
    return dq, dk, dv


def index_kl_fwd(q, k, index_q, index_k, block_indices, token_starts, block_size: int, scale: float,
                 index_scale: float, teacher_lse=None):
    """Returns float32 ``kl_rows`` ``[T, G]``, ``index_lse`` ``[T, G]`` and ``teacher_lse`` ``[T, Hq]``.

    ``teacher_lse`` (the Main Branch LSE over the same support) is computed
    when not given.
    """
    total, n_groups = index_q.shape[:2]
    kl_rows = torch.empty(total, n_groups, dtype=torch.float32, device=q.device)
    index_lse = torch.empty_like(kl_rows)
    have_teacher_lse = teacher_lse is not None
    if not have_teacher_lse:
        teacher_lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if total:
        index_kl_fwd_kernel[(total, n_groups)](
            q, k, index_q, index_k, block_indices, token_starts, teacher_lse, kl_rows, index_lse,
            scale * LOG2E.value, index_scale, **_heads(q, k), DI=index_q.shape[2], BLOCK_SIZE=block_size,
            TOPK=block_indices.shape[-1], HAVE_TEACHER_LSE=have_teacher_lse, UPCAST=INTERPRET, num_warps=4)
    return kl_rows, index_lse, teacher_lse


def index_kl_bwd(q, k, index_q, index_k, block_indices, token_starts, cu_seqlens, max_seqlen: int,
                 teacher_lse, index_lse, grad_scale, block_size: int, scale: float, index_scale: float):
    """Float32 gradients ``d index_q`` ``[T, G, Di]`` and ``d index_k`` ``[T, 1, Di]`` of
    ``grad_scale * sum(kl_rows)`` (``grad_scale`` a float32 ``[1]`` tensor)."""
    total, n_groups, index_dim = index_q.shape
    d_index_q = torch.empty(total, n_groups, index_dim, dtype=torch.float32, device=q.device)
    partial = torch.empty(n_groups, total, index_dim, dtype=torch.float32, device=q.device)
    if total:
        heads = _heads(q, k)
        common = dict(**heads, DI=index_dim, BLOCK_SIZE=block_size, UPCAST=INTERPRET)
        index_kl_bwd_dq_kernel[(total, n_groups)](
            q, k, index_q, index_k, block_indices, token_starts, teacher_lse, index_lse, grad_scale, d_index_q,
            scale * LOG2E.value, index_scale, TOPK=block_indices.shape[-1], **common, num_warps=4)
        csr = build_block_csr(block_indices, cu_seqlens, max_seqlen, block_size)
        index_kl_bwd_dk_kernel[(csr.n_block_slots, n_groups)](
            q, k, index_q, index_k, cu_seqlens, csr.offsets, csr.tokens, teacher_lse, index_lse, grad_scale, partial,
            scale * LOG2E.value, index_scale, csr.n_block_slots, total, MAX_BLOCKS=csr.max_blocks,
            QT=max(1, 64 // heads["RP"]), **common, num_warps=8)
    return d_index_q, partial.sum(0).unsqueeze(1)
