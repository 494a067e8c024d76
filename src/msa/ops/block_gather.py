"""The PyTorch backend of the Main Branch and the KL loss: gather the selected blocks.

Instead of masking a dense ``[S, S]`` score matrix like :mod:`msa.reference`,
each query gathers only the ``topk * block_size`` keys of its blocks, so the
cost is O(S * topk * block_size): the path used on CPUs and wherever the
Triton kernels do not apply. All tensors are packed ``[T, H, D]`` with int32
``cu_seqlens``; queries are processed in chunks, recomputed in the backward
pass (activation checkpointing) so that memory stays linear in T.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from msa.reference import masked_softmax, support_kl
from msa.varlen import token_positions

# Elements of one chunk's gathered [queries, G, topk * block_size, D] keys.
_CHUNK_ELEMENTS = 2**24


def gather_support(block_indices, starts, positions, block_size):
    """Packed token index and validity of every key of the listed blocks.

    ``block_indices`` ``[C, G, K]``, ``starts``/``positions`` ``[C]``. Returns
    ``key_index`` int64 ``[C, G, K * block_size]`` (0 where invalid) and the
    bool ``valid`` of the same shape (block listed and key visible).
    """
    offsets = torch.arange(block_size, device=block_indices.device)
    key_positions = (block_indices.long().unsqueeze(-1) * block_size + offsets).flatten(-2)
    valid = (block_indices.unsqueeze(-1) >= 0).expand(*block_indices.shape, block_size).flatten(-2)
    valid = valid & (key_positions <= positions[:, None, None])
    key_index = torch.where(valid, starts[:, None, None] + key_positions, 0)
    return key_index, valid


def gather_heads(x: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, G, D]``, ``key_index`` ``[C, G, L]`` -> ``x[key_index[c, g, l], g]`` ``[C, G, L, D]``."""
    total, n_groups, dim = x.shape
    rows = key_index + torch.arange(n_groups, device=x.device)[:, None] * total
    return x.transpose(0, 1).reshape(n_groups * total, dim).index_select(0, rows.flatten()).view(*key_index.shape, dim)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 on the PyTorch paths."""
    return torch.promote_types(dtype, torch.float32)


def _per_chunk(fn, n_tokens: int, elements_per_token: int, *tensors):
    """Run ``fn(start, end, *tensors)`` over token chunks, checkpointed when autograd records."""
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_token))
    record = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, max(n_tokens, 1), step):  # one empty chunk when T = 0
        end = min(n_tokens, start + step)
        if record:
            yield checkpoint(fn, start, end, *tensors, use_reentrant=False)
        else:
            yield fn(start, end, *tensors)


def sparse_attention(q, k, v, block_indices, cu_seqlens, block_size, scale):
    """Returns ``out`` ``[T, Hq, D]`` and ``lse`` ``[T, Hq]`` in the dtype of the inputs."""
    total, _, head_dim = q.shape
    n_groups = k.shape[1]
    starts, positions = token_positions(cu_seqlens, total)

    def chunk(start, end, q, k, v):
        key_index, valid = gather_support(block_indices[start:end], starts[start:end], positions[start:end], block_size)
        keys, values = gather_heads(k, key_index), gather_heads(v, key_index)
        queries = q[start:end].unflatten(1, (n_groups, -1))
        logits = scale * torch.einsum("cgrd,cgld->cgrl", queries, keys)
        probs, lse = masked_softmax(logits, valid.unsqueeze(2))
        return torch.einsum("cgrl,cgld->cgrd", probs, values).flatten(1, 2), lse.flatten(1, 2)

    per_token = n_groups * block_indices.shape[-1] * block_size * head_dim
    outs, lses = zip(*_per_chunk(chunk, total, per_token, q, k, v))
    return torch.cat(outs), torch.cat(lses)


def index_kl_sum(q, k, index_q, index_k, block_indices, cu_seqlens, block_size, scale, index_scale):
    """Sum over (token, group) rows of KL(teacher || student) on the selected support."""
    total, _, head_dim = q.shape
    n_groups = k.shape[1]
    starts, positions = token_positions(cu_seqlens, total)

    def chunk(start, end, index_q, index_k):
        key_index, valid = gather_support(block_indices[start:end], starts[start:end], positions[start:end], block_size)
        head_logits = scale * torch.einsum("cgrd,cgld->cgrl", q[start:end].unflatten(1, (n_groups, -1)),
                                           gather_heads(k, key_index))
        index_logits = index_scale * torch.einsum("cgd,cgld->cgl", index_q[start:end],
                                                  gather_heads(index_k.expand(-1, n_groups, -1), key_index))
        return support_kl(head_logits, index_logits, valid)

    per_token = n_groups * block_indices.shape[-1] * block_size * (head_dim + index_q.shape[-1])
    return sum(_per_chunk(chunk, total, per_token, index_q, index_k), index_q.new_zeros(()))
